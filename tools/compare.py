"""Compare methods over seeds in one command: train what is not done, then tabulate the validation scores.

    python tools/compare.py --config configs/demo.yaml --methods supervised unimatch UCCL MLCL \\
        --seeds 0 1 2 --save-root runs/cmp [key=value ...]
    python tools/compare.py --config configs/demo.yaml --methods unimatch DUEB \\
        --variant CPCL DUEB dueb.aleatoric=off dueb.energy=off --save-root runs/cmp
    python tools/compare.py --collect --save-root runs/cmp [--methods ...]   # runs launched elsewhere

Each method x seed trains in `ROOT/METHOD/seedS` as its own process,
`python METHOD.py --config CFG --save-path ROOT/METHOD/seedS key=value ... seed=S` (with `--nproc N`,
under `torchrun --standalone --nproc_per_node N`), one after the other, seed by seed, its output in
`ROOT/METHOD/seedS/compare.log`. Running the command again skips the finished runs and resumes the others
(the entry scripts resume from their latest.pth). A run that fails is reported and the next one starts.
A method is a script name in the repository root (`unimatch` -> unimatch.py) or a path to a script.
`--variant NAME SCRIPT KEY=VALUE ...` adds a row named NAME that runs SCRIPT with these overrides on top of
the common ones (a method with some terms off, another preset), in `ROOT/NAME/seedS`; the variants follow
the methods in the table.

`--collect` trains nothing: it reads the run folders that exist (laid out as above: a scheduler can launch
each run with the command above and collect them afterwards).

Results come from each run's `evals.jsonl` (one line per evaluation and network, written by the engine).
A run is finished when its last evaluation is at its final iteration. `ROOT/results.md` and
`ROOT/results.csv` give, per run, the best and final validation mIoU, the per-class IoU at the best
evaluation and the training seconds per iteration, and per method the mean ± sample standard deviation
over its finished runs and the difference to the first method.
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset.classes import dataset_classes  # noqa: E402
from util.config import ConfigError, load_config  # noqa: E402

EVALS = "evals.jsonl"


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
    seconds_per_iter: float | None = None
    best_iou: list = field(default_factory=list)  # per class, at the best evaluation
    note: str = ""


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


def run_config(folder: str, fallback: dict | None) -> dict | None:
    """The resolved config the engine saved in the run folder, else the comparison's config."""
    path = os.path.join(folder, "config.yaml")
    if os.path.isfile(path):
        with open(path) as f:
            saved = yaml.safe_load(f)
        if isinstance(saved, dict):
            return saved
    return fallback


def read_run(run: Run, cfg: dict | None, world_size: int) -> Run:
    """Fill `run` from its folder's evals.jsonl; `cfg` gives the planned length when the file does not."""
    path = os.path.join(run.folder, EVALS)
    if not os.path.isfile(path):
        return run
    records, bad = read_evals(path)
    if bad:
        run.note = f"{bad} unreadable line(s) in {EVALS}"
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
    if last.get("seconds_per_iter") is not None:
        run.seconds_per_iter = float(last["seconds_per_iter"])

    if "total_iters" in last:
        run.final_iteration = int(last["total_iters"])
    else:
        cfg = run_config(run.folder, cfg)
        try:
            run.final_iteration = planned_iterations(cfg, world_size) if cfg else None
        except (OSError, KeyError, TypeError) as err:
            run.note = (run.note + "; " if run.note else "") + f"length unknown ({err})"
    run.status = "finished" if run.iteration == run.final_iteration else "partial"
    return run


# ---------------------------------------------------------------------------------------------------
# Tables


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


@dataclass
class Summary:
    method: str
    runs: int  # finished runs, the ones averaged
    best: tuple
    final: tuple
    seconds_per_iter: float | None
    best_iou: list  # per class, mean over the finished runs


def summarise(method: str, runs: list[Run], nclass: int) -> Summary:
    done = [r for r in runs if r.status == "finished"]
    with_iou = [r.best_iou for r in done if len(r.best_iou) == nclass]
    iou = [statistics.fmean(column) for column in zip(*with_iou)] if with_iou else []
    speed = [r.seconds_per_iter for r in done if r.seconds_per_iter is not None]
    return Summary(
        method,
        len(done),
        mean_std([r.best_miou for r in done]),
        mean_std([r.final_miou for r in done]),
        statistics.fmean(speed) if speed else None,
        iou,
    )


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
        f"to {first.method if first else 'the first method'}. mIoU in %.",
        "",
        "| method | finished runs | best mIoU | Δ best | final mIoU | Δ final | s / iter |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        best, final = fmt(delta(s, "best"), sign=True), fmt(delta(s, "final"), sign=True)
        md.append(
            f"| {s.method} | {s.runs} | {fmt_mean_std(*s.best)} | {best} "
            f"| {fmt_mean_std(*s.final)} | {final} | {fmt(s.seconds_per_iter, 3)} |"
        )
    md += [
        "",
        "## Runs",
        "",
        "| method | seed | status | iteration | best mIoU (at) | final mIoU | s / iter | note |",
    ]
    md.append("|---|---|---|---|---|---|---|---|")
    for r in runs:
        at = f" ({r.best_iteration})" if r.best_iteration is not None else ""
        of = f" / {r.final_iteration}" if r.final_iteration is not None else ""
        md.append(
            f"| {r.method} | {r.seed} | {r.status} | {fmt(r.iteration, 0)}{of} | {fmt(r.best_miou)}{at} "
            f"| {fmt(r.final_miou)} | {fmt(r.seconds_per_iter, 3)} | {r.note} |"
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

    columns = ["row", "method", "seed", "status", "iteration", "final_iteration", "best_miou",
               "best_iteration", "final_miou", "delta_best", "delta_final", "seconds_per_iter"]  # fmt: skip
    rows = []
    for r in runs:
        row = dict(row="run", method=r.method, seed=r.seed, status=r.status, iteration=r.iteration)
        row.update(final_iteration=r.final_iteration, best_miou=r.best_miou, best_iteration=r.best_iteration)
        row.update(final_miou=r.final_miou, seconds_per_iter=r.seconds_per_iter)
        if len(r.best_iou) == len(names):
            row.update({f"iou_{name}": v for name, v in zip(names, r.best_iou)})
        rows.append(row)
    for s in summaries:
        row = dict(row="mean", method=s.method, status=f"{s.runs} finished", best_miou=s.best[0])
        row.update(final_miou=s.final[0], delta_best=delta(s, "best"), delta_final=delta(s, "final"))
        row.update(
            {f"iou_{name}": v for name, v in zip(names, s.best_iou)}, seconds_per_iter=s.seconds_per_iter
        )
        rows += [row, dict(row="std", method=s.method, best_miou=s.best[1], final_miou=s.final[1])]
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns + [f"iou_{name}" for name in names])
        writer.writeheader()
        writer.writerows(rows)
    return summaries


# ---------------------------------------------------------------------------------------------------
# Running


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


def train(script: str, config: str, folder: str, seed: int, overrides: list[str], nproc: int) -> int:
    """One training process (or torchrun group), its output appended to folder/compare.log."""
    if nproc > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
        ]
    else:
        launcher = [sys.executable]
    command = [*launcher, script, "--config", config, "--save-path", folder, *overrides, f"seed={seed}"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "compare.log"), "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        return subprocess.call(command, cwd=os.getcwd(), stdout=log, stderr=subprocess.STDOUT)


def tail(path: str, lines: int = 5) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


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


def main(argv=None) -> list[Summary]:
    args = parse_args(argv)
    # `--methods a b key=value`: the overrides after the method names are overrides, not methods
    if args.methods:
        args.overrides = [m for m in args.methods if "=" in m] + args.overrides
        args.methods = [m for m in args.methods if "=" not in m]
    try:
        if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
            raise ConfigError("give seeds with --seeds, not as a seed= override")
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        if not args.collect and (args.config is None or not (args.methods or args.variant)):
            raise ConfigError("--config and --methods are required to train (or pass --collect)")
        cfg = load_config(args.config, args.overrides) if args.config else None
        if args.collect:
            names = [*(args.methods or []), *(v[0] for v in args.variant)]
            methods, seeds = discover(args.save_root, names, args.seeds)
        else:
            rows = entries(args.methods or [], args.variant)
            for entry in rows.values():
                if entry.overrides:  # a bad variant stops here, before any run trains
                    load_config(args.config, args.overrides + entry.overrides)
            methods, seeds = list(rows), args.seeds if args.seeds is not None else [0, 1, 2]
        if not methods or not seeds:
            raise ConfigError(f"no runs to collect under {args.save_root}")
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    runs, failed = [], []
    total = len(methods) * len(seeds)
    for seed in seeds:
        for method in methods:
            run = Run(method, seed, os.path.join(args.save_root, method, f"seed{seed}"))
            read_run(run, cfg, args.nproc)
            if not args.collect and run.status != "finished":
                print(f"[{len(runs) + 1}/{total}] {method} seed {seed}: training in {run.folder}", flush=True)
                entry = rows[method]
                overrides = args.overrides + entry.overrides
                code = train(entry.script, args.config, run.folder, seed, overrides, args.nproc)
                run = read_run(Run(method, seed, run.folder), cfg, args.nproc)
                if code != 0:
                    run.status, run.note = "failed", f"exit status {code}"
                    failed.append(run)
                    log = os.path.join(run.folder, "compare.log")
                    print(f"  failed (exit status {code}); the end of {log}:\n{tail(log)}", flush=True)
            runs.append(run)
            if run.status == "finished":
                print(f"[{len(runs)}/{total}] {method} seed {seed}: best {fmt(run.best_miou)}, "
                      f"final {fmt(run.final_miou)}", flush=True)  # fmt: skip

    names_cfg = cfg or next((c for c in (run_config(r.folder, None) for r in runs) if c), None)
    if names_cfg is None:
        print(f"error: no run under {args.save_root} has a config.yaml; pass --config", file=sys.stderr)
        sys.exit(2)
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
        sys.exit(1)
    return summaries


if __name__ == "__main__":
    main()
