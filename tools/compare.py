"""Compare methods over seeds in one command: train what is not done, then tabulate the validation scores.

    python tools/compare.py --config configs/demo.yaml --methods supervised unimatch UCCL MLCL \\
        --seeds 0 1 2 --save-root runs/cmp [--jobs 2] [key=value ...]
    python tools/compare.py --config configs/demo.yaml --methods unimatch DUEB \\
        --variant CPCL DUEB dueb.aleatoric=off dueb.energy=off --save-root runs/cmp
    python tools/compare.py --collect --save-root runs/cmp [--methods ...]   # runs launched elsewhere

Each method x seed trains in `ROOT/METHOD/seedS` as its own process,
`python METHOD.py --config CFG --save-path ROOT/METHOD/seedS key=value ... seed=S` (with `--nproc N`,
under `torchrun --standalone --nproc_per_node N`), seed by seed, its output in
`ROOT/METHOD/seedS/compare.log`.
`--jobs N` trains N runs at a time (a free slot takes the next run in that order); with N > 1 each run is
pinned to CPU cores of its own (`--nproc` of them) with OMP_NUM_THREADS=1, so that runs sharing a machine
do not slow each other down with spinning threads. Running the command again skips the finished runs and
resumes the others (the entry scripts resume from their latest.pth). A run that fails is reported and the
next one starts. A method is a script name in the repository root (`unimatch` -> unimatch.py) or a path to
a script. `--variant NAME SCRIPT KEY=VALUE ...` adds a row named NAME that runs SCRIPT with these overrides
on top of the common ones (a method with some terms off, another preset), in `ROOT/NAME/seedS`; the
variants follow the methods in the table.

A run folder is only reused for the config it was made with: when its resolved config (the `config.yaml`
the engine writes; a staged CISC-R run's `stages.json`) differs from what the command asks, nothing trains
and the differing keys are listed (exit 2), unless `--allow-config-changes` (finished runs are then kept
and the others resume with the new config; the table notes the keys). A run folder another process is
training in (its `.lock` held) is not started again.

Signals: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 are passed on to every running run, which stops after its
step with latest.pth written (exit 75); compare waits for them, starts no other, writes the tables and exits
75 itself: the same command continues. Runs are started in a session of their own (a signal reaches each
once, from compare) and are sent SIGTERM if compare dies, even by SIGKILL: no run outlives it.

`--collect` trains nothing: it reads the run folders that exist (laid out as above: a scheduler can launch
each run with the command above and collect them afterwards).

Results come from each run's `evals.jsonl` (one line per evaluation and network, written by the engine).
A run is finished when its last evaluation is at its final iteration and its checkpoint exists: best.pth,
and latest.pth at the final iteration where there is a latest.pth (a run whose last save failed, exit 4, is
not). `ROOT/results.md` and `ROOT/results.csv` give, per run, the best and final validation mIoU, the
per-class IoU at the best evaluation, the iterations, the wall-clock time, the training seconds per
iteration and, where the unlabeled images have masks, the pseudo-labels' accuracy and used share; per
method the mean (± sample standard deviation) over its finished runs and the difference to the first method.

Exit statuses: 0 every run finished; 1 a run failed; 2 bad input, a changed config or nothing to collect
(nothing trained or written); 75 stopped by a signal (the runs saved; run the same command again).
"""

import argparse
import csv
import ctypes
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset.classes import dataset_classes  # noqa: E402
from util import lock  # noqa: E402
from util.config import ConfigError, defaults, load_config  # noqa: E402

EVALS = "evals.jsonl"
# The engine's "stopped by a signal, latest.pth written: run the same command again" (util/engine/run.py),
# and the signals that stop it (util/engine/stop.py). Not imported: util.engine brings the whole training
# stack, seconds of imports for a table.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


@dataclass
class PseudoLabels:
    """One stream's pseudo-labels over the training steps before an evaluation, against the unlabeled
    images' masks, in %: pixel accuracy, mIoU, and the share of pixels the losses used."""

    accuracy: float | None = None
    miou: float | None = None
    used: float | None = None


@dataclass
class Run:
    """What a run folder says about one method x seed."""

    method: str
    seed: int
    folder: str
    status: str = "missing"  # missing | partial | finished | failed
    iteration: int | None = None  # of the last evaluation
    final_iteration: int | None = None
    best_miou: float | None = None
    best_iteration: int | None = None
    final_miou: float | None = None
    seconds_per_iter: float | None = None  # training steps only
    train_seconds: float | None = None  # at the last evaluation, since iteration 0
    wall_seconds: float | None = None  # at the last evaluation, everything since the run started
    best_iou: list = field(default_factory=list)  # per class, at the best evaluation
    # {stream: PseudoLabels} at the first and at the last evaluation that measured them
    pseudo_first: dict = field(default_factory=dict)
    pseudo_last: dict = field(default_factory=dict)
    note: str = ""

    @property
    def stream(self) -> str | None:
        """The first stream of pseudo-labels the run reports (the table's)."""
        return next(iter(self.pseudo_first), None)

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text


# ---------------------------------------------------------------------------------------------------
# Reading a run


def read_evals(path: str) -> tuple[list[dict], int]:
    """The evaluation records of an evals.jsonl, and how many lines could not be read.

    A line cut short by a killed process (the last one) or otherwise unreadable is counted, not fatal.
    """
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["iteration"]), float(record["miou"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            records.append(record)
    return records, bad


def number(value) -> float | None:
    """A finite number of a record, else None (older records lack the key; a writer may put null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_pseudo_labels(value) -> dict[str, PseudoLabels]:
    """{stream: PseudoLabels} of a record's "pseudo_labels"; what is not a number reads as None."""
    if not isinstance(value, dict):
        return {}
    return {
        str(stream): PseudoLabels(*(number(stats.get(k)) for k in ("accuracy", "miou", "used")))
        for stream, stats in value.items()
        if isinstance(stats, dict)
    }


def first_by_iteration(records: list[dict], key: str) -> dict[int, object]:
    """{iteration: `key` of the first of its records that has it}: the networks evaluated at one iteration
    share what the training measured (time, pseudo-labels)."""
    found = {}
    for record in records:
        if record.get(key) is not None:
            found.setdefault(int(record["iteration"]), record[key])
    return found


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def planned_iterations(cfg: dict, world_size: int = 1) -> int:
    """The iteration a run of this config ends at, as the engine counts it.

    `max_iters`, else `epochs` x batches per epoch: the labeled list is repeated to the length of the
    unlabeled one, each loader keeps whole batches of every process's share, and an epoch ends with the
    shortest loader.
    """
    if cfg.get("max_iters"):
        return cfg["max_iters"]
    num_labeled = count_lines(cfg["labeled_id_path"])
    lengths = [num_labeled]
    if cfg.get("unlabeled_id_path"):
        num_unlabeled = count_lines(cfg["unlabeled_id_path"])
        lengths = [max(num_labeled, num_unlabeled), num_unlabeled]
    return cfg["epochs"] * min((n // world_size) // cfg["batch_size"] for n in lengths)


def saved_config(folder: str) -> dict | None:
    """The resolved config a run folder was trained with: its config.yaml (the engine writes it at every
    start) or, for a staged CISC-R run (whose stage folders hold their stages' configs), the one its
    stages.json records. None when there is neither; a ConfigError names a file that cannot be read."""
    path = os.path.join(folder, "config.yaml")
    try:
        if os.path.isfile(path):
            with open(path) as f:
                saved = yaml.safe_load(f)
        else:
            path = os.path.join(folder, "stages.json")
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                saved = json.load(f).get("config")
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as err:
        raise ConfigError(f"cannot read the config of run {folder} from {path}: {err}") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a config (a mapping of keys to values)")
    return saved


def run_config(folder: str, fallback: dict | None) -> dict | None:
    """The resolved config the engine saved in the run folder, else (none, or unreadable) `fallback`."""
    try:
        return saved_config(folder) or fallback
    except ConfigError:
        return fallback


MISSING = object()


def config_differences(saved: dict, asked: dict, default: dict, prefix: str = "") -> list[str]:
    """'key: saved -> asked' for each key (dotted inside sections) whose value differs.

    A key the saved config lacks was added to the code after the run started: the run had its default
    behaviour, so it differs only when the command asks for another value. A key only the saved config has
    was removed from the code; nothing can ask for it.
    """
    changes = []
    for key, new in asked.items():
        old = saved.get(key, default.get(key, MISSING))
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_differences(old, new, default.get(key) or {}, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {'(not set)' if old is MISSING else repr(old)} -> {new!r}")
    return changes


def checkpoint_iteration(path: str) -> int | None:
    """The iteration a training checkpoint holds, None when it cannot be read. Its tensors are memory-
    mapped, not read: this stays cheap for checkpoints of any size."""
    for mmap in (True, False):  # files written by torch before 2.1 cannot be mapped
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # truncated, corrupted, refused: the engine says why when it resumes
            continue
        iteration = state.get("iteration") if isinstance(state, dict) else None
        return iteration if isinstance(iteration, int) else None
    return None


def checkpoint_problem(folder: str, final_iteration: int) -> str | None:
    """Why a run whose final evaluation is in evals.jsonl is not finished on disk, or None.

    Its result is best.pth. A latest.pth at an earlier iteration means the final save failed (the engine's
    exit 4): the same command then trains from it again. A run without latest.pth (removed to save space;
    a staged CISC-R run keeps its own in its stage folders) is judged by best.pth alone.
    """
    if not os.path.isfile(os.path.join(folder, "best.pth")):
        return "no best.pth"
    latest = os.path.join(folder, "latest.pth")
    if not os.path.isfile(latest):
        return None
    iteration = checkpoint_iteration(latest)
    if iteration is None:
        return "latest.pth cannot be read"
    if iteration != final_iteration:
        return f"latest.pth holds iteration {iteration}, not {final_iteration}: its last save failed"
    return None


def read_run(run: Run, cfg: dict | None, world_size: int) -> Run:
    """Fill `run` from its folder's evals.jsonl; `cfg` gives the planned length when the file does not."""
    path = os.path.join(run.folder, EVALS)
    if not os.path.isfile(path):
        return run
    records, bad = read_evals(path)
    if bad:
        run.add_note(f"{bad} unreadable line(s) in {EVALS}")
    # What training measured is in every network's record; a staged CISC-R run's earlier stages count too.
    pseudo = first_by_iteration(records, "pseudo_labels")
    if pseudo:
        run.pseudo_first = read_pseudo_labels(pseudo[min(pseudo)])
        run.pseudo_last = read_pseudo_labels(pseudo[max(pseudo)])
    # Only the networks that can be deployed score a run, when the engine says which those are.
    records = [r for r in records if r.get("deploy", True)]
    if not records:
        return run

    # One score per evaluation: its best network (the one best.pth would hold).
    by_iteration = {}
    for record in records:
        it = int(record["iteration"])
        if it not in by_iteration or record["miou"] > by_iteration[it]["miou"]:
            by_iteration[it] = record
    last = by_iteration[max(by_iteration)]
    best = max(by_iteration.values(), key=lambda r: (r["miou"], -int(r["iteration"])))
    run.iteration = int(last["iteration"])
    run.final_miou = float(last["miou"])
    run.best_miou, run.best_iteration = float(best["miou"]), int(best["iteration"])
    run.best_iou = [float(v) for v in best.get("iou", [])]
    run.train_seconds = number(first_by_iteration(records, "train_seconds").get(run.iteration))
    run.wall_seconds = number(first_by_iteration(records, "wall_seconds").get(run.iteration))
    # Since iteration 0 across resumes when the record says; older records: since the last (re)start.
    if run.train_seconds is not None and run.iteration > 0:
        run.seconds_per_iter = run.train_seconds / run.iteration
    elif last.get("seconds_per_iter") is not None:
        run.seconds_per_iter = float(last["seconds_per_iter"])

    if "total_iters" in last:
        run.final_iteration = int(last["total_iters"])
    else:
        cfg = run_config(run.folder, cfg)
        try:
            run.final_iteration = planned_iterations(cfg, world_size) if cfg else None
        except (OSError, KeyError, TypeError) as err:
            run.add_note(f"length unknown ({err})")
    run.status = "partial"
    if run.iteration == run.final_iteration:
        problem = checkpoint_problem(run.folder, run.final_iteration)
        if problem:
            run.add_note(problem)
        else:
            run.status = "finished"
    return run


# ---------------------------------------------------------------------------------------------------
# Tables


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(value, digits=2, sign=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def fmt_mean_std(mean, std) -> str:
    return fmt(mean) + ("" if std is None else f" ± {fmt(std)}")


def fmt_minutes(seconds: float | None) -> str:
    return fmt(None if seconds is None else seconds / 60, 1)


def fmt_change(first: float | None, last: float | None) -> str:
    """'71.2 → 80.5': a pseudo-label measure at the first and at the last evaluation."""
    if first is None and last is None:
        return "–"
    return f"{fmt(first, 1)} → {fmt(last, 1)}"


@dataclass
class Summary:
    method: str
    runs: int  # finished runs, the ones averaged
    best: tuple
    final: tuple
    seconds_per_iter: float | None
    best_iou: list  # per class, mean over the finished runs
    iterations: float | None = None
    wall_seconds: float | None = None
    stream: str | None = None  # the pseudo-label stream of the table, and its means at the first and
    pseudo_first: PseudoLabels = field(default_factory=PseudoLabels)  # at the last evaluation
    pseudo_last: PseudoLabels = field(default_factory=PseudoLabels)


def mean_pseudo_labels(measured: list[PseudoLabels]) -> PseudoLabels:
    return PseudoLabels(*(mean([getattr(p, k) for p in measured]) for k in ("accuracy", "miou", "used")))


def summarise(method: str, runs: list[Run], nclass: int) -> Summary:
    done = [r for r in runs if r.status == "finished"]
    with_iou = [r.best_iou for r in done if len(r.best_iou) == nclass]
    iou = [statistics.fmean(column) for column in zip(*with_iou)] if with_iou else []
    stream = next((r.stream for r in done if r.stream), None)
    with_stream = [r for r in done if stream in r.pseudo_first and stream in r.pseudo_last]
    return Summary(
        method,
        len(done),
        mean_std([r.best_miou for r in done]),
        mean_std([r.final_miou for r in done]),
        mean([r.seconds_per_iter for r in done]),
        iou,
        iterations=mean([r.final_iteration for r in done]),
        wall_seconds=mean([r.wall_seconds for r in done]),
        stream=stream,
        pseudo_first=mean_pseudo_labels([r.pseudo_first[stream] for r in with_stream]),
        pseudo_last=mean_pseudo_labels([r.pseudo_last[stream] for r in with_stream]),
    )


def pseudo_label_cells(first: dict | PseudoLabels, last: dict | PseudoLabels, stream: str | None) -> str:
    """The table's two pseudo-label cells, accuracy and used share, first → last evaluation."""
    if isinstance(first, dict):  # a run's {stream: PseudoLabels}
        first, last = first.get(stream, PseudoLabels()), last.get(stream, PseudoLabels())
    return f"{fmt_change(first.accuracy, last.accuracy)} | {fmt_change(first.used, last.used)}"


def write_results(root: str, runs: list[Run], methods: list[str], names: tuple, title: str) -> list[Summary]:
    summaries = [summarise(m, [r for r in runs if r.method == m], len(names)) for m in methods]
    first = next((s for s in summaries if s.runs), None)

    def delta(summary, which):
        if first is None or not summary.runs:
            return None
        return getattr(summary, which)[0] - getattr(first, which)[0]

    md = [f"# {title}", ""]
    md += [
        f"Mean ± sample standard deviation over each method's finished runs; Δ: difference of the means "
        f"to {first.method if first else 'the first method'}. mIoU in %. Time: wall-clock minutes of a whole "
        "run (training, evaluations and, for staged CISC-R, the work between its stages); s / iter: "
        "seconds of training steps per iteration. PL: the pseudo-labels of the method's first stream "
        "against the unlabeled masks (where they have them), at the first → last evaluation: pixel "
        "accuracy and the share of pixels used, in % (results.csv has every stream); staged CISC-R: the "
        "labels stage 2 writes for every unlabeled image → those stage 5 writes for the unreliable half.",
        "",
        "| method | finished runs | best mIoU | Δ best | final mIoU | Δ final | iterations | time (min) "
        "| s / iter | PL accuracy | PL used |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        best, final = fmt(delta(s, "best"), sign=True), fmt(delta(s, "final"), sign=True)
        md.append(
            f"| {s.method} | {s.runs} | {fmt_mean_std(*s.best)} | {best} "
            f"| {fmt_mean_std(*s.final)} | {final} "
            f"| {fmt(s.iterations, 0)} | {fmt_minutes(s.wall_seconds)} | {fmt(s.seconds_per_iter, 3)} "
            f"| {pseudo_label_cells(s.pseudo_first, s.pseudo_last, s.stream)} |"
        )
    md += [
        "",
        "## Runs",
        "",
        "| method | seed | status | iteration | best mIoU (at) | final mIoU | time (min) | s / iter "
        "| PL accuracy | PL used | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        at = f" ({r.best_iteration})" if r.best_iteration is not None else ""
        of = f" / {r.final_iteration}" if r.final_iteration is not None else ""
        md.append(
            f"| {r.method} | {r.seed} | {r.status} | {fmt(r.iteration, 0)}{of} | {fmt(r.best_miou)}{at} "
            f"| {fmt(r.final_miou)} | {fmt_minutes(r.wall_seconds)} | {fmt(r.seconds_per_iter, 3)} "
            f"| {pseudo_label_cells(r.pseudo_first, r.pseudo_last, r.stream)} | {r.note} |"
        )
    md += ["", "## Per-class IoU at each run's best evaluation (mean over finished runs)", ""]
    md.append("| class | " + " | ".join(s.method for s in summaries) + " |")
    md.append("|---|" + "---|" * len(summaries))
    for c, name in enumerate(names):
        md.append(
            f"| {name} | " + " | ".join(fmt(s.best_iou[c]) if s.best_iou else "–" for s in summaries) + " |"
        )
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    write_csv(os.path.join(root, "results.csv"), runs, summaries, names, delta)
    return summaries


def write_csv(path: str, runs: list[Run], summaries: list[Summary], names: tuple, delta) -> None:
    """One row per run, then a mean and a std row per method. Pseudo-labels: `pl_first_*` the table's
    stream (`pl_stream`) at the first evaluation, `pl_<stream>_*` every stream at the last one."""
    streams = list(dict.fromkeys(s for r in runs for s in r.pseudo_last))
    measures = ("accuracy", "miou", "used")
    columns = ["row", "method", "seed", "status", "iteration", "final_iteration", "best_miou",
               "best_iteration", "final_miou", "delta_best", "delta_final", "seconds_per_iter",
               "train_seconds", "wall_seconds",
               "pl_stream", "pl_first_accuracy", "pl_first_used"]  # fmt: skip
    columns += [f"pl_{s}_{m}" for s in streams for m in measures] + [f"iou_{name}" for name in names]

    def pseudo_label_columns(stream, first: PseudoLabels | None, last: dict[str, PseudoLabels]) -> dict:
        row = dict(pl_stream=stream)
        if first is not None:
            row.update(pl_first_accuracy=first.accuracy, pl_first_used=first.used)
        for s, measured in last.items():
            row.update({f"pl_{s}_{m}": getattr(measured, m) for m in measures})
        return row

    rows = []
    for r in runs:
        row = dict(row="run", method=r.method, seed=r.seed, status=r.status, iteration=r.iteration)
        row.update(final_iteration=r.final_iteration, best_miou=r.best_miou, best_iteration=r.best_iteration)
        row.update(final_miou=r.final_miou, seconds_per_iter=r.seconds_per_iter)
        row.update(train_seconds=r.train_seconds, wall_seconds=r.wall_seconds)
        row.update(pseudo_label_columns(r.stream, r.pseudo_first.get(r.stream), r.pseudo_last))
        if len(r.best_iou) == len(names):
            row.update({f"iou_{name}": v for name, v in zip(names, r.best_iou)})
        rows.append(row)
    for s in summaries:
        done = [r for r in runs if r.method == s.method and r.status == "finished"]
        last = {
            stream: mean_pseudo_labels([r.pseudo_last[stream] for r in done if stream in r.pseudo_last])
            for stream in streams
            if any(stream in r.pseudo_last for r in done)
        }
        row = dict(row="mean", method=s.method, status=f"{s.runs} finished", best_miou=s.best[0])
        row.update(final_miou=s.final[0], delta_best=delta(s, "best"), delta_final=delta(s, "final"))
        row.update(final_iteration=s.iterations, seconds_per_iter=s.seconds_per_iter)
        row.update(train_seconds=mean([r.train_seconds for r in done]), wall_seconds=s.wall_seconds)
        row.update(pseudo_label_columns(s.stream, s.pseudo_first if s.stream else None, last))
        row.update({f"iou_{name}": v for name, v in zip(names, s.best_iou)})
        rows += [row, dict(row="std", method=s.method, best_miou=s.best[1], final_miou=s.final[1])]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------
# Running: the runs to train, the child processes, the signals


def method_script(method: str) -> tuple[str, str]:
    """(name, script path) of a method given as a script name in the repository root or as a path."""
    if method.endswith(".py"):
        path = os.path.abspath(method)
        name = os.path.splitext(os.path.basename(method))[0]
    else:
        path, name = os.path.join(ROOT, method + ".py"), method
    if not os.path.isfile(path):
        tools = ("eval.py", "predict.py")
        scripts = sorted(n[:-3] for n in os.listdir(ROOT) if n.endswith(".py") and n not in tools)
        raise ConfigError(f"method '{method}': no script {path} (methods here: {', '.join(scripts)})")
    return name, path


@dataclass
class Entry:
    """A row of the comparison: the script it runs and its own overrides (a variant's)."""

    script: str
    overrides: list[str] = field(default_factory=list)


def entries(methods: list[str], variants: list[list[str]]) -> dict[str, Entry]:
    """{row name: Entry} of --methods and each --variant NAME SCRIPT [KEY=VALUE ...]."""
    table = {name: Entry(path) for name, path in (method_script(m) for m in methods)}
    for variant in variants:
        if len(variant) < 2 or "=" in variant[0] or "=" in variant[1]:
            raise ConfigError(f"--variant {' '.join(variant)}: give NAME SCRIPT [KEY=VALUE ...]")
        name, method, *overrides = variant
        if name in table:
            raise ConfigError(f"--variant {name}: a row of that name exists already")
        if not all("=" in o for o in overrides):
            raise ConfigError(f"--variant {name}: overrides are KEY=VALUE, got {overrides}")
        table[name] = Entry(method_script(method)[1], overrides)
    return table


@dataclass
class Job:
    """A run to train, if it is not finished: its script, overrides and the config they resolve to."""

    run: Run
    script: str
    overrides: list[str]  # the common ones, then the row's; seed= is added at launch
    config: dict  # what the command asks for this run, seed included
    number: int  # 1-based position in the comparison (seed by seed), for the messages
    changes: list[str] = field(default_factory=list)  # keys of its folder's config that differ (allowed)

    def label(self, total: int) -> str:
        return f"[{self.number}/{total}] {self.run.method} seed {self.run.seed}"

    def read(self, cfg: dict | None, world_size: int) -> Run:
        """The run as its folder says now."""
        run = read_run(Run(self.run.method, self.run.seed, self.run.folder), cfg, world_size)
        if self.changes:
            run.add_note("config differs: " + ", ".join(self.changes))
        return run


def check_reuse(jobs: list[Job]) -> dict[str, list[str]]:
    """{run folder: its config differences} for the run folders made with another config than asked."""
    changed, default = {}, defaults()
    for job in jobs:
        saved = saved_config(job.run.folder)
        differences = config_differences(saved, job.config, default) if saved is not None else []
        if differences:
            changed[job.run.folder] = differences
    return changed


def lock_holder(folder: str) -> str | None:
    """Who holds a run folder's lock (or a stage folder's, for staged CISC-R), or None: a training process
    that another compare left behind, or one launched by hand. Its .lock file names it."""
    paths = glob.glob(os.path.join(glob.escape(folder), ".lock"))
    paths += glob.glob(os.path.join(glob.escape(folder), "*", ".lock"))
    return next((name for name in map(lock.holder, paths) if name is not None), None)


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
PR_SET_PDEATHSIG = 1


def child_setup(cores: list[int] | None):
    """What a child runs between fork and exec: SIGTERM when compare dies (even of SIGKILL, which leaves
    no chance to pass a signal on), so that the run saves and ends instead of training on as an orphan that
    holds its folder; then the CPU cores it may use."""
    parent = os.getpid()

    def setup():
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # compare died before the line above
                os.kill(os.getpid(), signal.SIGTERM)
        if cores:
            os.sched_setaffinity(0, cores)

    return setup


def slot_cores(jobs: int, nproc: int) -> list[list[int]] | None:
    """The CPU cores of each of `jobs` slots, `nproc` each; None (no pinning) for one slot."""
    if jobs == 1:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if jobs * nproc > len(cores):
        raise ConfigError(
            f"--jobs {jobs} x --nproc {nproc} needs {jobs * nproc} CPU cores, one per process; this process "
            f"may use {len(cores)} ({', '.join(map(str, cores))})"
        )
    return [cores[i * nproc : (i + 1) * nproc] for i in range(jobs)]


def launch_command(script: str, config: str, folder: str, overrides: list[str], nproc: int) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, script, "--config", config, "--save-path", folder, *overrides]


@dataclass
class Child:
    """A training process compare started, its output going to `log`."""

    job: Job
    process: subprocess.Popen
    slot: int
    log: TextIO


def start_child(job: Job, config: str, nproc: int, slot: int, cores: list[int] | None) -> Child:
    """One training process (or torchrun group) in a session of its own, its output appended to
    compare.log in the run folder. Pinned to `cores` with one OpenMP thread when given."""
    seed = job.run.seed
    command = launch_command(job.script, config, job.run.folder, [*job.overrides, f"seed={seed}"], nproc)
    os.makedirs(job.run.folder, exist_ok=True)
    env = dict(os.environ)
    if cores is not None:
        env["OMP_NUM_THREADS"] = "1"
    log = open(os.path.join(job.run.folder, "compare.log"), "a")
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    # A session of its own: Ctrl-C reaches only compare, which passes it on once (torchrun must not get two).
    process = subprocess.Popen(
        command, cwd=os.getcwd(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        preexec_fn=child_setup(cores),
    )  # fmt: skip
    return Child(job, process, slot, log)


class SignalForwarder:
    """Passes the first SIGINT/SIGTERM/SIGUSR1 on to every running child (each then saves and exits 75) and
    notes it, so that no other run starts. Later signals are reported and ignored, like the engine's: a
    second Ctrl-C must not interrupt the saves."""

    def __init__(self):
        self.signal: int | None = None
        self.children: list[subprocess.Popen] = []
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def add(self, process: subprocess.Popen) -> None:
        self.children.append(process)
        if self.signal is not None:  # it came while the child was being started
            process.send_signal(self.signal)

    def remove(self, process: subprocess.Popen) -> None:
        self.children.remove(process)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _on_signal(self, signum: int, frame) -> None:
        # Written straight to stderr: the signal may have interrupted a print holding the stream's lock.
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            for process in self.children:
                process.send_signal(signum)
            note = (
                f"{name}: passed on to {len(self.children)} run(s); waiting for them to write latest.pth "
                "and end, starting no other"
            )
        else:
            note = (
                f"{name} again: ignored, still waiting for the runs to save (SIGKILL ends compare; they save)"
            )
        os.write(2, f"\ncompare: {note}\n".encode())


def tail(path: str, lines: int = 5) -> str:
    """The last lines of a log, each as a terminal would leave it (a progress bar's last state)."""
    try:
        with open(path, errors="replace") as f:
            shown = [line.rstrip("\n").rsplit("\r", 1)[-1] for line in f.readlines()[-lines:]]
    except OSError:
        return ""
    return "".join(line + "\n" for line in shown if line.strip())


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def newest_latest(folder: str) -> str | None:
    """The run's latest.pth most recently written: its own, or (staged CISC-R) the one of the training stage
    it was in. None when there is none."""
    found = glob.glob(os.path.join(folder, "latest.pth")) + glob.glob(os.path.join(folder, "*", "latest.pth"))
    return max(found, key=os.path.getmtime) if found else None


def collect_child(child: Child, stop: SignalForwarder, cfg: dict, nproc: int, total: int) -> tuple[Run, bool]:
    """The run of a child that ended, read again from its folder, and whether it failed."""
    child.log.close()
    job, code = child.job, child.process.returncode
    run, label = job.read(cfg, nproc), job.label(total)
    if code == 0:
        return run, False
    if stop.signal is not None:  # stopped by the signal compare passed on, or ended before it could save
        latest = newest_latest(run.folder)
        held = checkpoint_iteration(latest) if latest else None
        where = os.path.relpath(latest, run.folder) if latest else ""
        saved = f"{where} holds iteration {held}" if held is not None else "no latest.pth"
        how = "stopped" if code == EXIT_REQUEUE else f"ended ({describe_exit(code)})"
        run.add_note(f"{how} by {stop.name}; {saved}")
        print(f"{label}: {how} by {stop.name}; {saved}", flush=True)
        return run, False
    run.status = "failed"
    run.add_note(describe_exit(code))
    log = os.path.join(run.folder, "compare.log")
    print(f"{label}: failed ({describe_exit(code)}); the end of {log}:\n{tail(log)}", flush=True)
    return run, True


def train_runs(jobs: list[Job], args, cfg: dict, total: int, stop: SignalForwarder) -> tuple[list[Run], list]:
    """Train the jobs, `args.jobs` at a time, in their order; on a stop signal wait for the running ones
    and start no other. Returns every job's run as it ended (or as read, when it did not start) and the
    failed ones."""
    cores = slot_cores(args.jobs, args.nproc)
    pending, running, free = list(jobs), [], list(range(args.jobs))
    ended, failed = [], []
    while running or (pending and stop.signal is None):
        while pending and free and stop.signal is None:
            job = pending.pop(0)
            label = job.label(total)
            holder = lock_holder(job.run.folder)
            if holder is not None:
                job.run.status = "failed"
                job.run.add_note(f"in use by another process ({holder})")
                print(f"{label}: not started, {job.run.folder} is in use by another process ({holder})")
                ended.append(job.run)
                failed.append(job.run)
                continue
            slot = free.pop(0)
            where = f" (CPU {','.join(map(str, cores[slot]))})" if cores else ""
            print(f"{label}: training in {job.run.folder}{where}", flush=True)
            child = start_child(job, args.config, args.nproc, slot, cores[slot] if cores else None)
            running.append(child)
            stop.add(child.process)
        for child in [c for c in running if c.process.poll() is not None]:
            running.remove(child)
            stop.remove(child.process)
            free = sorted([*free, child.slot])
            run, bad = collect_child(child, stop, cfg, args.nproc, total)
            ended.append(run)
            if bad:
                failed.append(run)
            elif run.status == "finished":
                print(f"{child.job.label(total)}: best {fmt(run.best_miou)}, final {fmt(run.final_miou)}",
                      flush=True)  # fmt: skip
        if running:
            time.sleep(0.1)
    return ended + [job.run for job in pending], failed


# ---------------------------------------------------------------------------------------------------
# The command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="the config every run trains with (required unless --collect)")
    parser.add_argument("--methods", nargs="+", help="script names or paths; the first is the baseline of Δ")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="default: 0 1 2, or the seedN folders (--collect)"
    )
    parser.add_argument(
        "--variant", nargs="+", action="append", default=[], metavar="NAME SCRIPT KEY=VALUE",
        help="one more row: SCRIPT with these overrides, in SAVE_ROOT/NAME (repeatable)",
    )  # fmt: skip
    parser.add_argument("--save-root", required=True, help="runs go to SAVE_ROOT/METHOD/seedS")
    parser.add_argument("--collect", action="store_true", help="train nothing; tabulate the existing runs")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun), default 1")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="runs trained at a time, default 1; with more, each is pinned to CPU cores of its own",
    )  # fmt: skip
    parser.add_argument(
        "--allow-config-changes", action="store_true",
        help="reuse (finished) or resume run folders made with another config than the command asks",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. max_iters=500")
    return parser.parse_intermixed_args(argv)


def discover(root: str, methods, seeds) -> tuple[list[str], list[int]]:
    """Methods and seeds of --collect: as given, else the METHOD/seedS folders under root."""
    if not methods:
        methods = sorted(e.name for e in os.scandir(root) if e.is_dir()) if os.path.isdir(root) else []
    if not seeds:
        found = {
            int(e.name[4:])
            for m in methods
            if os.path.isdir(os.path.join(root, m))
            for e in os.scandir(os.path.join(root, m))
            if e.is_dir() and e.name.startswith("seed") and e.name[4:].isdigit()
        }
        seeds = sorted(found)
    return list(methods), list(seeds)


def plan(args, rows: dict[str, Entry], seeds: list[int]) -> list[Job]:
    """Every method x seed, seed by seed, with the config the command asks for it (a bad variant stops
    here, before any run trains)."""
    row_configs = {name: load_config(args.config, args.overrides + e.overrides) for name, e in rows.items()}
    jobs = []
    for seed in seeds:
        for name, entry in rows.items():
            run = Run(name, seed, os.path.join(args.save_root, name, f"seed{seed}"))
            config = {**row_configs[name], "seed": seed}
            jobs.append(Job(run, entry.script, args.overrides + entry.overrides, config, len(jobs) + 1))
    return jobs


def config_change_message(changed: dict[str, list[str]], root: str) -> str:
    lines = [f"run folders under {root} were made with another config than this command asks:"]
    for folder, differences in changed.items():
        shown = differences[:8] + ([f"... {len(differences) - 8} more"] if len(differences) > 8 else [])
        lines.append(f"  {folder}: " + "; ".join(shown))
    lines.append(
        "Nothing was trained. Use another --save-root (or the command these runs were made with), or pass "
        "--allow-config-changes to keep the finished runs as they are and resume the others with this config."
    )
    return "\n".join(lines)


def main(argv=None) -> list[Summary]:
    args = parse_args(argv)
    # `--methods a b key=value`: the overrides after the method names are overrides, not methods
    if args.methods:
        args.overrides = [m for m in args.methods if "=" in m] + args.overrides
        args.methods = [m for m in args.methods if "=" not in m]
    jobs = []
    try:
        if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
            raise ConfigError("give seeds with --seeds, not as a seed= override")
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
        if not args.collect and (args.config is None or not (args.methods or args.variant)):
            raise ConfigError("--config and --methods are required to train (or pass --collect)")
        cfg = load_config(args.config, args.overrides) if args.config else None
        if args.collect:
            names = [*(args.methods or []), *(v[0] for v in args.variant)]
            methods, seeds = discover(args.save_root, names, args.seeds)
        else:
            rows = entries(args.methods or [], args.variant)
            methods, seeds = list(rows), args.seeds if args.seeds is not None else [0, 1, 2]
            slot_cores(args.jobs, args.nproc)
            jobs = plan(args, rows, seeds)
            changed = check_reuse(jobs)
            if changed and not args.allow_config_changes:
                raise ConfigError(config_change_message(changed, args.save_root))
            for job in jobs:
                job.changes = [d.split(":", 1)[0] for d in changed.get(job.run.folder, [])]
        if not methods or not seeds:
            raise ConfigError(f"no runs to collect under {args.save_root}")
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    total = len(methods) * len(seeds)
    if args.collect:
        runs = [
            read_run(Run(m, s, os.path.join(args.save_root, m, f"seed{s}")), cfg, args.nproc)
            for s in seeds
            for m in methods
        ]
        failed, stop = [], SignalForwarder()
    else:
        runs, to_train = [], []
        for job in jobs:
            job.run = job.read(cfg, args.nproc)
            if job.run.status == "finished":
                print(f"{job.label(total)}: finished before: best {fmt(job.run.best_miou)}, final "
                      f"{fmt(job.run.final_miou)}")  # fmt: skip
                runs.append(job.run)
            else:
                to_train.append(job)
        stop = SignalForwarder()
        stop.install()
        try:
            trained, failed = train_runs(to_train, args, cfg, total, stop)
        finally:
            stop.restore()
        runs += trained

    names_cfg = cfg or next((c for c in (run_config(r.folder, None) for r in runs) if c), None)
    if names_cfg is None:
        print(f"error: no run under {args.save_root} has a config.yaml; pass --config", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    names = dataset_classes(names_cfg).names
    os.makedirs(args.save_root, exist_ok=True)
    title = f"Comparison on {args.config or names_cfg.get('dataset')}" + (
        f" ({' '.join(args.overrides)})" if args.overrides else ""
    )
    runs.sort(key=lambda r: (methods.index(r.method), r.seed))
    summaries = write_results(args.save_root, runs, methods, names, title)
    print(f"results: {os.path.join(args.save_root, 'results.md')} and results.csv")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.method} seed {r.seed}" for r in failed))
    if stop.signal is not None:
        print(f"stopped by {stop.name}: the runs that were training saved latest.pth; run the same command "
              "to continue")  # fmt: skip
        sys.exit(EXIT_REQUEUE)
    if failed:
        sys.exit(EXIT_FAILED)
    return summaries


if __name__ == "__main__":
    main()
