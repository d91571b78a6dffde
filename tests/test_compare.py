"""tools/compare.py: tables from run folders (fabricated evals.jsonl), and the train/skip/resume loop."""

import csv
import json
import os
import statistics
import sys

import pytest
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
    assert "| unimatch | 2 | 52.50 ± 0.71 | +9.17 | 52.50 ± 0.71 | +10.50 | 1.100 |" in md
    assert "| supervised | 1 | finished | 6 / 6 | 45.00 (3) | 41.00 | 1.500 | 1 unreadable line(s)" in md
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
# Training: a method script that records its calls and can fail once

FAKE_METHOD = """
import json, os, sys
import yaml

args = sys.argv[1:]
config, save = args[args.index("--config") + 1], args[args.index("--save-path") + 1]
overrides = [a for a in args if "=" in a]
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([os.path.basename(__file__), save, overrides]) + "\\n")
with open(config) as f:
    cfg = yaml.safe_load(f)
for text in overrides:
    key, value = text.split("=", 1)
    cfg[key] = yaml.safe_load(value)
os.makedirs(save, exist_ok=True)
with open(os.path.join(save, "config.yaml"), "w") as f:
    yaml.safe_dump(cfg, f)
gain = 10.0 if "better" in __file__ else 0.0
fail = os.environ.get("FAIL_ONCE") == save and not os.path.exists(save + ".failed")
with open(os.path.join(save, "evals.jsonl"), "w") as f:
    for it in range(3, cfg["max_iters"] + 1, 3):
        f.write(json.dumps(dict(iteration=it, network="model", miou=30 + gain + cfg["seed"] + it,
                                iou=[1, 2, 3], seconds_per_iter=0.25)) + "\\n")
        if fail:
            open(save + ".failed", "w").close()
            sys.exit(3)
"""


def test_trains_skips_finished_runs_and_reruns_failed_ones(tmp_path, monkeypatch, capsys):
    scripts = []
    for name in ("base.py", "better.py"):
        (tmp_path / name).write_text(FAKE_METHOD)
        scripts.append(str(tmp_path / name))
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    root = tmp_path / "cmp"
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(calls))
    monkeypatch.setenv("FAIL_ONCE", str(root / "better" / "seed1"))
    command = [
        "--config",
        str(config),
        "--methods",
        *scripts,
        "--seeds",
        "0",
        "1",
        "--save-root",
        str(root),
        "max_iters=9",
    ]

    with pytest.raises(SystemExit) as info:
        compare.main(command)
    assert info.value.code == 1
    out = capsys.readouterr().out
    assert "better seed 1" in out and "exit status 3" in out
    first = [json.loads(line) for line in calls.read_text().splitlines()]
    # seed by seed, every method; the seed comes last and the overrides reach every run
    assert [(c[0], os.path.relpath(c[1], root)) for c in first] == [
        ("base.py", "base/seed0"), ("better.py", "better/seed0"),
        ("base.py", "base/seed1"), ("better.py", "better/seed1"),
    ]  # fmt: skip
    assert all(c[2] == ["max_iters=9", f"seed={c[1][-1]}"] for c in first)
    rows = {(r["method"], r["seed"]): r for r in read_csv(root / "results.csv") if r["row"] == "run"}
    assert rows["better", "1"]["status"] == "failed" and rows["better", "1"]["iteration"] == "3"

    summaries = compare.main(command)  # the same command again: only the failed run trains
    again = [json.loads(line) for line in calls.read_text().splitlines()][len(first) :]
    assert [os.path.relpath(c[1], root) for c in again] == ["better/seed1"]
    assert [(s.method, s.runs, s.best[0], s.final[0]) for s in summaries] == [
        ("base", 2, 39.5, 39.5), ("better", 2, 49.5, 49.5)
    ]  # fmt: skip
    assert "| better | 2 | 49.50 ± 0.71 | +10.00 |" in (root / "results.md").read_text()
    assert "$ " + sys.executable in (root / "base" / "seed0" / "compare.log").read_text()


def test_variant_runs_its_script_with_its_overrides(tmp_path, monkeypatch):
    (tmp_path / "base.py").write_text(FAKE_METHOD)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    root, calls = tmp_path / "cmp", tmp_path / "calls.jsonl"
    monkeypatch.setenv("CALLS", str(calls))
    summaries = compare.main(
        ["--config", str(config), "--methods", str(tmp_path / "base.py"), "max_iters=6",
         "--variant", "longer", str(tmp_path / "base.py"), "max_iters=9", "lr=0.5",
         "--seeds", "0", "--save-root", str(root)]
    )  # fmt: skip
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    # the variant's overrides come after the common ones, so they win
    assert [(os.path.relpath(c[1], root), c[2]) for c in made] == [
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
    ],
)
def test_bad_input_stops_before_training(tmp_path, capsys, args, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    with pytest.raises(SystemExit) as info:
        compare.main(["--config", str(config), "--save-root", str(tmp_path / "cmp"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_real_run_with_the_engine(tiny_config, tmp_path):
    """One real training run: the engine's evals.jsonl is read, its length (epochs, no max_iters) is the
    one compare plans, and the same command again trains nothing."""
    root = tmp_path / "cmp"
    command = ["--config", tiny_config, "--methods", "supervised", "--seeds", "0", "--save-root", str(root)]
    command += ["max_iters=null", "epochs=1"]  # 18 unlabeled images, batch 2: 9 iterations
    (summary,) = compare.main(command)
    assert summary.runs == 1
    run = compare.read_run(compare.Run("supervised", 0, str(root / "supervised" / "seed0")), None, 1)
    assert (run.status, run.iteration, run.final_iteration) == ("finished", 9, 9)
    assert len(run.best_iou) == 6 and run.seconds_per_iter > 0
    compare.main(command)
    assert (root / "supervised" / "seed0" / "compare.log").read_text().count("$ ") == 1
