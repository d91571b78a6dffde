"""tools/compare.py: tables from run folders (fabricated evals.jsonl), and the train/skip/resume loop."""

import csv
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tools import compare

CONFIG = """
dataset: mine
data_root: {root}
nclass: 3
crop_size: 32
val_id_path: {root}/val.txt
epochs: 1
max_iters: 6
batch_size: 2
lr: 0.01
"""


def write_run(folder, evals, cfg, truncated=False):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    open(os.path.join(folder, "best.pth"), "w").close()  # a finished run's result exists
    with open(os.path.join(folder, "evals.jsonl"), "w") as f:
        for it, network, miou, iou, spi in evals:
            record = dict(iteration=it, network=network, miou=miou, iou=iou, seconds_per_iter=spi)
            f.write(json.dumps(record) + "\n")
        if truncated:
            f.write('{"iteration": 6, "network": "mo')  # killed in the middle of a write


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def number(text):
    return float(text) if text not in ("", None) else None


@pytest.fixture
def runs(tmp_path):
    """supervised: 3 finished seeds; unimatch: seed 0 finished, seed 1 with two networks (an EMA
    teacher), seed 2 stopped at iteration 3 of 6 (partial)."""
    root = tmp_path / "cmp"
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    cfg = yaml.safe_load(CONFIG.format(root=tmp_path))
    sup = {0: [(3, 40.0), (6, 42.0)], 1: [(3, 45.0), (6, 41.0)], 2: [(3, 39.0), (6, 43.0)]}
    for seed, points in sup.items():
        evals = [(it, "model", m, [m - 1, m, m + 1 + seed], 0.5 + seed) for it, m in points]
        write_run(root / "supervised" / f"seed{seed}", evals, cfg, truncated=seed == 1)
    write_run(
        root / "unimatch" / "seed0",
        [(3, "model", 50.0, [1, 2, 3], 0.9), (6, "model", 52.0, [4, 5, 6], 1.0)],
        cfg,
    )
    write_run(
        root / "unimatch" / "seed1",
        [(3, "model", 48.0, [0, 0, 0], 1.1), (3, "ema", 49.0, [7, 7, 7], 1.1),
         (6, "model", 51.0, [0, 0, 0], 1.2), (6, "ema", 53.0, [8, 9, 10], 1.2)],
        cfg,
    )  # fmt: skip
    write_run(root / "unimatch" / "seed2", [(3, "model", 60.0, [60, 60, 60], 0.7)], cfg)
    return root


def test_collect_tables(runs, capsys):
    compare.main(
        [
            "--collect",
            "--save-root",
            str(runs),
            "--methods",
            "supervised",
            "unimatch",
            "--seeds",
            "0",
            "1",
            "2",
            "3",
        ]
    )
    rows = read_csv(runs / "results.csv")
    by_run = {(r["method"], r["seed"]): r for r in rows if r["row"] == "run"}
    mean = {r["method"]: r for r in rows if r["row"] == "mean"}
    std = {r["method"]: r for r in rows if r["row"] == "std"}

    assert [by_run["supervised", s]["status"] for s in "0123"] == ["finished"] * 3 + ["missing"]
    assert (
        number(by_run["supervised", "1"]["best_miou"]) == 45.0
        and by_run["supervised", "1"]["best_iteration"] == "3"
    )
    assert number(by_run["supervised", "1"]["final_miou"]) == 41.0
    assert [number(by_run["supervised", "1"][f"iou_{c}"]) for c in ("sky", "road", "car")] == [44, 45, 47]
    assert number(mean["supervised"]["best_miou"]) == pytest.approx(statistics.fmean([42, 45, 43]))
    assert number(std["supervised"]["best_miou"]) == pytest.approx(statistics.stdev([42, 45, 43]))
    assert number(mean["supervised"]["final_miou"]) == pytest.approx(42.0)
    assert number(mean["supervised"]["seconds_per_iter"]) == pytest.approx(1.5)
    assert number(mean["supervised"]["iou_car"]) == pytest.approx(
        statistics.fmean([43 + 0, 45 + 1 + 1, 43 + 1 + 2])
    )

    # an evaluation scores with its best network; the partial run is listed but not averaged
    assert (
        number(by_run["unimatch", "1"]["best_miou"]) == 53.0
        and number(by_run["unimatch", "1"]["final_miou"]) == 53.0
    )
    assert [number(by_run["unimatch", "1"][f"iou_{c}"]) for c in ("sky", "road", "car")] == [8, 9, 10]
    assert by_run["unimatch", "2"]["status"] == "partial" and by_run["unimatch", "2"]["iteration"] == "3"
    assert mean["unimatch"]["status"] == "2 finished"
    assert number(mean["unimatch"]["best_miou"]) == pytest.approx(52.5)
    assert number(std["unimatch"]["best_miou"]) == pytest.approx(statistics.stdev([52, 53]))
    assert number(mean["unimatch"]["delta_best"]) == pytest.approx(52.5 - statistics.fmean([42, 45, 43]))
    assert number(mean["unimatch"]["delta_final"]) == pytest.approx(52.5 - 42.0)
    assert number(mean["unimatch"]["iou_road"]) == pytest.approx((5 + 9) / 2)

    md = (runs / "results.md").read_text()
    assert "| unimatch | 2 | 52.50 ± 0.71 | +9.17 | 52.50 ± 0.71 | +10.50 | 6 | – | 1.100 | – | – |" in md
    assert (
        "| supervised | 1 | finished | 6 / 6 | 45.00 (3) | 41.00 | – | 1.500 | – | – | 1 unreadable line(s)"
        in md
    )
    assert "| car | 45.33 | 8.00 |" in md


def test_collect_discovers_methods_and_seeds(runs):
    summaries = compare.main(["--collect", "--save-root", str(runs)])
    assert [(s.method, s.runs) for s in summaries] == [("supervised", 3), ("unimatch", 2)]


def test_total_iters_in_evals_wins(tmp_path):
    cfg = yaml.safe_load(CONFIG.format(root=tmp_path))  # max_iters 6
    folder = tmp_path / "r"
    write_run(folder, [(4, "model", 1.0, [1, 1, 1], 0.1)], cfg)
    with open(folder / "evals.jsonl", "a") as f:
        f.write(json.dumps(dict(iteration=8, network="model", miou=2.0, iou=[2, 2, 2], total_iters=8)) + "\n")
    run = compare.read_run(compare.Run("m", 0, str(folder)), None, 1)
    assert (run.status, run.iteration, run.final_iteration, run.final_miou) == ("finished", 8, 8, 2.0)


def test_planned_iterations(tmp_path):
    labeled, unlabeled = tmp_path / "l.txt", tmp_path / "u.txt"
    labeled.write_text("".join(f"a{i}.jpg a{i}.png\n" for i in range(5)))
    unlabeled.write_text("".join(f"b{i}.jpg\n" for i in range(11)) + "\n")
    cfg = dict(epochs=3, batch_size=2, labeled_id_path=str(labeled), unlabeled_id_path=str(unlabeled))
    assert compare.planned_iterations(cfg) == 3 * 5  # 11 // 2 batches per epoch
    assert compare.planned_iterations(cfg, world_size=2) == 3 * 2  # 5 per process
    assert compare.planned_iterations({**cfg, "unlabeled_id_path": None}) == 3 * 2
    assert compare.planned_iterations({**cfg, "max_iters": 7}) == 7


# ---------------------------------------------------------------------------------------------------
# Training: a method script that records its calls, writes what the engine writes (the resolved config,
# evals.jsonl, best.pth and latest.pth), can fail once, and can wait for a stop signal like the engine

FAKE_METHOD = """
import json, os, shutil, signal, sys, time
import yaml

args = sys.argv[1:]
save = args[args.index("--save-path") + 1]
overrides = [a for a in args if "=" in a]
with open(os.environ["CALLS"], "a") as f:
    call = [os.path.basename(__file__), save, overrides, sorted(os.sched_getaffinity(0)),
            os.environ.get("OMP_NUM_THREADS"), time.time()]
    f.write(json.dumps(call) + "\\n")
with open(os.environ["RESOLVED"]) as f:  # the config file as load_config resolves it
    cfg = yaml.safe_load(f)
for text in overrides:
    key, value = text.split("=", 1)
    *sections, name = key.split(".")
    node = cfg
    for section in sections:
        node = node[section]
    node[name] = yaml.safe_load(value)
os.makedirs(save, exist_ok=True)
with open(os.path.join(save, "config.yaml"), "w") as f:
    yaml.safe_dump(cfg, f)

stop = []
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))


def checkpoint(name, it):  # a checkpoint holding {"iteration": it}, made by the test
    shutil.copy(os.path.join(os.environ["CKPTS"], f"{it}.pth"), os.path.join(save, name))


gain = 10.0 if "better" in __file__ else 0.0
fail = os.environ.get("FAIL_ONCE") == save and not os.path.exists(save + ".failed")
status = int(os.environ.get("FAIL_STATUS", "3"))
with open(os.path.join(save, "evals.jsonl"), "w") as f:
    for it in range(3, cfg["max_iters"] + 1, 3):
        f.write(json.dumps(dict(iteration=it, network="model", miou=30 + gain + cfg["seed"] + it,
                                iou=[1, 2, 3], seconds_per_iter=0.25, total_iters=cfg["max_iters"])) + "\\n")
        f.flush()
        if fail and status == 3:
            open(save + ".failed", "w").close()
            sys.exit(3)
        if not (fail and status == 4):  # 4: the disk is full, no checkpoint could be written
            checkpoint("best.pth", it)
            checkpoint("latest.pth", it)
        if it == int(os.environ.get("WAIT_AT", "0")):  # wait for a signal, then save slowly and stop
            open(save + ".ready", "w").close()
            deadline = time.time() + 60
            while not stop and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)
            with open(save + ".stopped", "w") as g:
                g.write(" ".join(stop))
            sys.exit(75)
        time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
if fail:
    open(save + ".failed", "w").close()
    sys.exit(status)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """FAKE_METHOD as base.py and better.py, the config they train with and what they read."""
    from util.config import load_config

    scripts = {}
    for name in ("base", "better"):
        (tmp_path / f"{name}.py").write_text(FAKE_METHOD)
        scripts[name] = str(tmp_path / f"{name}.py")
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(load_config(str(config))))
    (tmp_path / "ckpts").mkdir()
    for it in range(0, 31):
        torch.save({"iteration": it}, tmp_path / "ckpts" / f"{it}.pth")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("RESOLVED", str(tmp_path / "resolved.yaml"))
    monkeypatch.setenv("CKPTS", str(tmp_path / "ckpts"))
    return dict(scripts=scripts, config=str(config), root=tmp_path / "cmp", calls=tmp_path / "calls.jsonl")


def calls(fake) -> list:
    path = fake["calls"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_trains_skips_finished_runs_and_reruns_failed_ones(fake, monkeypatch, capsys):
    root = fake["root"]
    monkeypatch.setenv("FAIL_ONCE", str(root / "better" / "seed1"))
    command = ["--config", fake["config"], "--methods", *fake["scripts"].values(), "--seeds", "0", "1",
               "--save-root", str(root), "max_iters=9"]  # fmt: skip

    with pytest.raises(SystemExit) as info:
        compare.main(command)
    assert info.value.code == 1
    out = capsys.readouterr().out
    assert "better seed 1" in out and "exit status 3" in out
    first = calls(fake)
    # seed by seed, every method; the seed comes last and the overrides reach every run
    assert [(c[0], os.path.relpath(c[1], root)) for c in first] == [
        ("base.py", "base/seed0"), ("better.py", "better/seed0"),
        ("base.py", "base/seed1"), ("better.py", "better/seed1"),
    ]  # fmt: skip
    assert all(c[2] == ["max_iters=9", f"seed={c[1][-1]}"] for c in first)
    # one run at a time: not pinned, OpenMP left as it was
    assert all(
        c[3] == sorted(os.sched_getaffinity(0)) and c[4] == os.environ.get("OMP_NUM_THREADS") for c in first
    )
    rows = {(r["method"], r["seed"]): r for r in read_csv(root / "results.csv") if r["row"] == "run"}
    assert rows["better", "1"]["status"] == "failed" and rows["better", "1"]["iteration"] == "3"

    summaries = compare.main(command)  # the same command again: only the failed run trains
    assert [os.path.relpath(c[1], root) for c in calls(fake)[len(first) :]] == ["better/seed1"]
    assert [(s.method, s.runs, s.best[0], s.final[0]) for s in summaries] == [
        ("base", 2, 39.5, 39.5), ("better", 2, 49.5, 49.5)
    ]  # fmt: skip
    assert "| better | 2 | 49.50 ± 0.71 | +10.00 |" in (root / "results.md").read_text()
    assert "$ " + sys.executable in (root / "base" / "seed0" / "compare.log").read_text()


def test_variant_runs_its_script_with_its_overrides(fake):
    root, base = fake["root"], fake["scripts"]["base"]
    summaries = compare.main(
        ["--config", fake["config"], "--methods", base, "max_iters=6",
         "--variant", "longer", base, "max_iters=9", "lr=0.5", "--seeds", "0", "--save-root", str(root)]
    )  # fmt: skip
    # the variant's overrides come after the common ones, so they win
    assert [(os.path.relpath(c[1], root), c[2]) for c in calls(fake)] == [
        ("base/seed0", ["max_iters=6", "seed=0"]),
        ("longer/seed0", ["max_iters=6", "max_iters=9", "lr=0.5", "seed=0"]),
    ]
    assert [(s.method, s.runs, s.final[0]) for s in summaries] == [("base", 1, 36.0), ("longer", 1, 39.0)]
    collected = compare.main(
        ["--collect", "--save-root", str(root), "--methods", "base", "--variant", "longer"]
    )
    assert [s.method for s in collected] == ["base", "longer"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "nosuchmethod"], "no script"),
        (["--methods", "unimatch", "seed=3"], "--seeds"),
        (["--methods", "unimatch", "lr=fast"], "lr"),
        (["--methods", "unimatch", "--variant", "cpcl", "DUEB", "dueb.energy=sometimes"], "dueb.energy"),
        (["--methods", "unimatch", "--variant", "unimatch", "DUEB"], "exists already"),
        (["--variant", "cpcl"], "NAME SCRIPT"),
        ([], "--methods are required"),
        (["--methods", "unimatch", "--jobs", "0"], "--jobs must be at least 1"),
        (["--methods", "unimatch", "--jobs", "999"], "CPU cores"),
    ],
)
def test_bad_input_stops_before_training(tmp_path, capsys, args, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    with pytest.raises(SystemExit) as info:
        compare.main(["--config", str(config), "--save-root", str(tmp_path / "cmp"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------------------------------------------
# Stop signals: compare as its own process, as a user or a scheduler runs it

STOPPED = 75  # the exit status of a run stopped by a signal with latest.pth written (util/engine/run.py)

STOPPABLE = """
import os, runpy, sys

# A method script that is tests/run_training.py's supervised, waiting for a signal before iteration 4
# when READY_FILE is set (the signal comes from outside; the step then runs and the run stops after it).
runner = os.path.join({root!r}, "tests", "run_training.py")
wait = ["--wait-at", "4", "--ready-file", os.environ["READY_FILE"]] if os.environ.get("READY_FILE") else []
sys.argv = [runner, "supervised", *sys.argv[1:], *wait]
runpy.run_path(runner, run_name="__main__")
"""


def start_compare(args, log, **env):
    """tools/compare.py in a process group of its own, its output going to the file `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, os.path.join(compare.ROOT, "tools", "compare.py"), *args], cwd=compare.ROOT,
            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            start_new_session=True,
        )  # fmt: skip


def wait_for_files(paths, proc, log, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the runs never got to wait for a signal:\n{log.read_text()}")
        time.sleep(0.05)


def processes_naming(path) -> list[int]:
    """The processes whose command line names `path` (a test's temporary folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(path).encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def leftovers(tmp_path):
    """After the test: the processes it left behind under tmp_path, killed by their id (so that a failing
    test does not leave an orphan training)."""
    yield
    for pid in processes_naming(tmp_path):
        os.kill(pid, signal.SIGKILL)


def test_ctrl_c_stops_the_run_with_latest_saved_and_the_same_command_finishes_it(
    tiny_config, tmp_path, leftovers
):
    """Ctrl-C (SIGINT to compare's process group): compare passes it on, the run stops after its step with
    latest.pth at that iteration, compare exits 75 without a traceback and nothing is left running. The same
    command then resumes it; the engine's evals.jsonl is read, its length (epochs, no max_iters) is the one
    compare plans, and the command once more trains nothing."""
    (tmp_path / "stoppable.py").write_text(STOPPABLE.format(root=compare.ROOT))
    root, ready, log = tmp_path / "cmp", tmp_path / "ready", tmp_path / "compare.out"
    command = ["--config", tiny_config, "--methods", str(tmp_path / "stoppable.py"), "--seeds", "0"]
    command += ["--save-root", str(root), "max_iters=null", "epochs=1"]  # 18 unlabeled images, batch 2: 9
    proc = start_compare(command, log, READY_FILE=str(ready))
    wait_for_files([ready], proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == STOPPED, log.read_text()
    folder = root / "stoppable" / "seed0"
    assert torch.load(folder / "latest.pth", weights_only=True)["iteration"] == 5
    assert "stopped by SIGINT after iteration 5/9" in (folder / "compare.log").read_text()
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "stopped by SIGINT; latest.pth holds iteration 5" in out
    assert "| stoppable | 0 | partial | 3 / 9 |" in (root / "results.md").read_text()
    assert processes_naming(tmp_path) == []

    (summary,) = compare.main(command)
    assert summary.runs == 1 and "at iteration 5/9" in (folder / "compare.log").read_text()
    run = compare.read_run(compare.Run("stoppable", 0, str(folder)), None, 1)
    assert (run.status, run.iteration, run.final_iteration) == ("finished", 9, 9)
    assert len(run.best_iou) == 6 and run.seconds_per_iter > 0
    compare.main(command)
    assert (folder / "compare.log").read_text().count("$ ") == 2


def test_sigterm_to_compare_alone_reaches_the_run_which_saves_before_compare_ends(fake, leftovers):
    """SIGTERM to compare's process only (a scheduler, `kill PID`): the run gets it too, saves and ends
    before compare exits 75, instead of training on as an orphan that holds its folder. Even a SIGKILLed
    compare leaves no run behind. The same command then trains them to the end, nothing colliding."""
    root, log = fake["root"], fake["root"].parent / "compare.out"
    command = ["--config", fake["config"], "--methods", fake["scripts"]["base"], "--seeds", "0", "1",
               "--save-root", str(root), "max_iters=6"]  # fmt: skip
    proc = start_compare(command, log, WAIT_AT="3")
    folder = root / "base" / "seed0"
    wait_for_files([Path(f"{folder}.ready")], proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == STOPPED, log.read_text()
    assert processes_naming(root.parent) == []
    assert Path(f"{folder}.stopped").read_text() == "SIGTERM"  # and it was given the time to save
    assert [os.path.relpath(c[1], root) for c in calls(fake)] == ["base/seed0"]  # seed 1 never started
    table = (root / "results.md").read_text()
    assert "| base | 0 | partial | 3 / 6 |" in table and "| base | 1 | missing |" in table

    # SIGKILL, which compare cannot pass on: the run is sent SIGTERM by the kernel, and saves and ends
    Path(f"{folder}.ready").unlink()
    proc = start_compare(command, log, WAIT_AT="3")
    wait_for_files([Path(f"{folder}.ready")], proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while processes_naming(root.parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_naming(root.parent) == [] and Path(f"{folder}.stopped").read_text() == "SIGTERM"

    (summary,) = compare.main(command)
    assert [os.path.relpath(c[1], root) for c in calls(fake)] == ["base/seed0"] * 3 + ["base/seed1"]
    assert summary.runs == 2


def test_jobs_pin_each_run_to_its_own_core_and_signals_reach_every_run(fake, leftovers):
    """--jobs 2: two runs at a time, each on a CPU core of its own with one OpenMP thread; a SIGUSR1 to
    compare reaches both, and compare waits for both."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    root, log = fake["root"], fake["root"].parent / "compare.out"
    command = ["--config", fake["config"], "--methods", *fake["scripts"].values(), "--seeds", "0", "1",
               "--save-root", str(root), "--jobs", "2", "max_iters=6"]  # fmt: skip
    proc = start_compare(command, log, WAIT_AT="3")
    folders = [root / name / "seed0" for name in ("base", "better")]
    wait_for_files([Path(f"{f}.ready") for f in folders], proc, log)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=60) == STOPPED, log.read_text()
    assert processes_naming(root.parent) == []
    assert [Path(f"{f}.stopped").read_text() for f in folders] == ["SIGUSR1", "SIGUSR1"]
    started = calls(fake)
    assert sorted(os.path.relpath(c[1], root) for c in started) == ["base/seed0", "better/seed0"]
    cores = sorted(os.sched_getaffinity(0))
    assert sorted(c[3] for c in started) == [[cores[0]], [cores[1]]] and {c[4] for c in started} == {"1"}


def test_jobs_fill_free_slots_seed_by_seed(fake, monkeypatch, capsys):
    """The run that ends first frees its slot (and core) for the next run in seed-by-seed order."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores")
    monkeypatch.setenv("STEP_SECONDS", "0.5")
    root = fake["root"]
    base, better = fake["scripts"]["base"], fake["scripts"]["better"]
    monkeypatch.setenv("FAIL_ONCE", str(root / "base" / "seed0"))  # ends at once; better seed 0 takes 1 s
    command = ["--config", fake["config"], "--methods", base, better, "--seeds", "0", "1",
               "--save-root", str(root), "--jobs", "2", "max_iters=6"]  # fmt: skip
    with pytest.raises(SystemExit):
        compare.main(command)
    cores = sorted(os.sched_getaffinity(0))
    # "[3/4] base seed 1: training in ROOT/base/seed1 (CPU 0)": the order runs started in, and their cores
    started = re.findall(r"(\[\d/4\] \w+ seed \d): training in \S+ \(CPU (\d+)\)", capsys.readouterr().out)
    assert started[:3] == [
        ("[1/4] base seed 0", str(cores[0])), ("[2/4] better seed 0", str(cores[1])),
        ("[3/4] base seed 1", str(cores[0])),
    ]  # fmt: skip
    assert started[3][0] == "[4/4] better seed 1"
    by_folder = {os.path.relpath(c[1], root): c[3] for c in calls(fake)}
    assert by_folder["base/seed1"] == by_folder["base/seed0"] == [cores[0]]
    rows = {
        (r["method"], r["seed"]): r["status"] for r in read_csv(root / "results.csv") if r["row"] == "run"
    }
    assert rows == {("base", "0"): "failed", ("better", "0"): "finished", ("base", "1"): "finished",
                    ("better", "1"): "finished"}  # fmt: skip


def test_a_run_folder_in_use_is_not_started_again(fake, capsys):
    """A training process left running on a run folder (another compare's, one started by hand): compare
    names it instead of starting a second run there that would fail on its lock. The lock is taken as
    the engine takes it, in a process of its own; once that process is gone, its .lock file blocks nothing."""
    root = fake["root"]
    folder = root / "base" / "seed0"
    folder.mkdir(parents=True)
    command = ["--config", fake["config"], "--methods", fake["scripts"]["base"], "--seeds", "0",
               "--save-root", str(root), "max_iters=6"]  # fmt: skip
    hold = (
        "import sys; from util.lock import lock; held = lock(sys.argv[1]); print('held', flush=True); input()"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder / ".lock")], cwd=compare.ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as info:
            compare.main(command)
    finally:
        holder.communicate("\n", timeout=60)
    assert info.value.code == 1 and calls(fake) == []
    assert (
        f"in use by another process (host {socket.gethostname()}, PID {holder.pid},"
        in capsys.readouterr().out
    )

    compare.main(command)  # its holder gone, the same command trains the run
    assert [os.path.relpath(c[1], root) for c in calls(fake)] == ["base/seed0"]


# ---------------------------------------------------------------------------------------------------
# Reuse: only runs made with the config asked for, and only when their checkpoint exists


def test_runs_made_with_another_config_are_not_reused(fake, capsys):
    root, base = fake["root"], fake["scripts"]["base"]
    command = ["--config", fake["config"], "--methods", base, "--seeds", "0", "--save-root", str(root)]
    compare.main([*command, "max_iters=6"])
    table = (root / "results.md").read_text()

    for changed, difference in (
        (["max_iters=9"], "max_iters: 6 -> 9"),
        (["max_iters=6", "lr=0.5"], "lr: 0.01 -> 0.5"),
    ):
        with pytest.raises(SystemExit) as info:
            compare.main([*command, *changed])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"{root / 'base' / 'seed0'}: {difference}" in err
        assert (
            len(calls(fake)) == 1 and (root / "results.md").read_text() == table
        )  # nothing trained or written

    # asked to: the finished run is kept as it is, and the table says which keys differ
    (summary,) = compare.main([*command, "max_iters=9", "--allow-config-changes"])
    assert len(calls(fake)) == 1 and summary.runs == 1
    assert "| base | 0 | finished | 6 / 6 |" in (root / "results.md").read_text()
    assert "config differs: max_iters |" in (root / "results.md").read_text()


def test_config_differences_are_dotted_keys_and_a_key_added_since_reads_as_its_default():
    default = {"lr": 0.01, "added": False, "dueb": {"energy": "on", "aleatoric": "on"}}
    saved = {"lr": 0.01, "dueb": {"energy": "on"}, "removed": 1}
    asked = {"lr": 0.02, "added": False, "dueb": {"energy": "off", "aleatoric": "on"}}
    assert compare.config_differences(saved, asked, default) == [
        "lr: 0.01 -> 0.02",
        "dueb.energy: 'on' -> 'off'",
    ]
    assert compare.config_differences(saved, {**asked, "lr": 0.01, "added": True}, default) == [
        "added: False -> True", "dueb.energy: 'on' -> 'off'"
    ]  # fmt: skip


def test_a_run_without_its_final_checkpoint_is_not_finished(fake, monkeypatch, capsys):
    """A run whose last save failed (disk full: exit 4) has its final evaluation in evals.jsonl but no
    checkpoint: it is not finished, and the same command trains it again."""
    root, base = fake["root"], fake["scripts"]["base"]
    monkeypatch.setenv("FAIL_ONCE", str(root / "base" / "seed0"))
    monkeypatch.setenv("FAIL_STATUS", "4")
    command = ["--config", fake["config"], "--methods", base, "--seeds", "0", "--save-root", str(root)]
    with pytest.raises(SystemExit) as info:
        compare.main([*command, "max_iters=6"])
    assert info.value.code == 1 and "exit status 4" in capsys.readouterr().out
    run = compare.read_run(compare.Run("base", 0, str(root / "base" / "seed0")), None, 1)
    assert (run.status, run.iteration, run.note) == ("partial", 6, "no best.pth")

    (summary,) = compare.main([*command, "max_iters=6"])  # space freed
    assert len(calls(fake)) == 2 and summary.runs == 1


def test_checkpoints_decide_whether_a_run_is_finished(tmp_path):
    cfg = yaml.safe_load(CONFIG.format(root=tmp_path))  # max_iters 6
    folder = tmp_path / "r"
    write_run(folder, [(3, "model", 1.0, [1, 1, 1], 0.1), (6, "model", 2.0, [2, 2, 2], 0.1)], cfg)

    def status():
        run = compare.read_run(compare.Run("m", 0, str(folder)), None, 1)
        return run.status, run.note

    assert status() == ("finished", "")  # best.pth, no latest.pth (removed to save space)
    torch.save({"iteration": 3}, folder / "latest.pth")  # the final save failed, the one before did not
    assert status() == ("partial", "latest.pth holds iteration 3, not 6: its last save failed")
    (folder / "latest.pth").write_bytes(b"not a checkpoint")
    assert status() == ("partial", "latest.pth cannot be read")
    torch.save({"iteration": 6}, folder / "latest.pth")
    assert status() == ("finished", "")
    (folder / "best.pth").unlink()
    assert status() == ("partial", "no best.pth")


# ---------------------------------------------------------------------------------------------------
# The time runs took and their pseudo-labels (evals.jsonl keys written by the engine)


def test_iterations_time_and_pseudo_labels_in_the_tables(tmp_path):
    root = tmp_path / "cmp"
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    cfg = yaml.safe_load(CONFIG.format(root=tmp_path))

    def pseudo(s_accuracy, s_used, fp_accuracy):
        return {"s": {"accuracy": s_accuracy, "miou": s_accuracy - 20, "used": s_used},
                "fp": {"accuracy": fp_accuracy, "miou": None, "used": 50.0}}  # fmt: skip

    for seed, (wall, train, first, last) in enumerate([(600, 300, 70.0, 80.0), (900, 420, 72.0, 81.0)]):
        folder = root / "unimatch" / f"seed{seed}"
        write_run(folder, [], cfg)
        at_3 = dict(iteration=3, total_iters=6, train_seconds=train / 2, wall_seconds=wall / 2)
        at_3.update(iou=[1, 2, 3], seconds_per_iter=99.0, pseudo_labels=pseudo(first, 40.0, 60.0))
        at_6 = dict(at_3, iteration=6, train_seconds=train, wall_seconds=wall, iou=[4, 5, 6])
        at_6.update(pseudo_labels=pseudo(last, 60.0, 65.0))
        records = [
            dict(at_3, network="model", miou=40.0),
            dict(at_3, network="ema", miou=41.0),
            dict(at_6, network="model", miou=45.0),
        ]
        (folder / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_run(root / "supervised" / "seed0", [(6, "model", 30.0, [1, 1, 1], 0.5)], cfg)  # an old record

    compare.main(["--collect", "--save-root", str(root), "--methods", "supervised", "unimatch"])
    md = (root / "results.md").read_text()
    # iterations; wall-clock minutes; training seconds per iteration; pseudo-labels first -> last evaluation
    assert "| supervised | 1 | 30.00 | +0.00 | 30.00 | +0.00 | 6 | – | 0.500 | – | – |" in md
    assert "| unimatch | 2 | 45.00 ± 0.00 | +15.00 | 45.00 ± 0.00 | +15.00 | 6 | 12.5 | 60.000 " \
        "| 71.0 → 80.5 | 40.0 → 60.0 |" in md  # fmt: skip
    assert (
        "| unimatch | 1 | finished | 6 / 6 | 45.00 (6) | 45.00 | 15.0 | 70.000 | 72.0 → 81.0 | 40.0 → 60.0 |"
        in md
    )
    rows = read_csv(root / "results.csv")
    run = next(r for r in rows if (r["row"], r["method"], r["seed"]) == ("run", "unimatch", "1"))
    mean = next(r for r in rows if (r["row"], r["method"]) == ("mean", "unimatch"))
    assert (number(run["wall_seconds"]), number(run["train_seconds"])) == (900, 420)
    assert (run["pl_stream"], number(run["pl_first_accuracy"]), number(run["pl_first_used"])) == ("s", 72, 40)
    assert [number(run[f"pl_s_{m}"]) for m in ("accuracy", "miou", "used")] == [81, 61, 60]
    assert [number(run[f"pl_fp_{m}"]) for m in ("accuracy", "miou", "used")] == [65, None, 50]
    assert number(mean["wall_seconds"]) == 750 and number(mean["pl_s_accuracy"]) == 80.5
    assert number(mean["final_iteration"]) == 6
    sup = next(r for r in rows if (r["row"], r["method"]) == ("run", "supervised"))
    assert sup["wall_seconds"] == sup["pl_stream"] == sup["pl_s_accuracy"] == ""


def test_a_stopped_staged_run_names_the_latest_pth_of_the_stage_it_was_in(tmp_path):
    from tools.compare import newest_latest

    assert newest_latest(str(tmp_path)) is None
    for n, stage in enumerate(("stage1", "stage4")):  # stage 4 written last
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "latest.pth").write_bytes(b"")
        os.utime(tmp_path / stage / "latest.pth", (1000 + n, 1000 + n))
    assert newest_latest(str(tmp_path)) == str(tmp_path / "stage4" / "latest.pth")
    (tmp_path / "latest.pth").write_bytes(b"")  # a single-loop run's own, newest
    assert newest_latest(str(tmp_path)) == str(tmp_path / "latest.pth")
