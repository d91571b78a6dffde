"""Time training steps of method scripts at one config, in one run, so that their ratios are fair.

    python tools/benchmark.py --config configs/demo.yaml --methods supervised unimatch --iters 20
    python tools/benchmark.py --released-settings          # the released code's settings on generated data
    python tools/benchmark.py --released-settings --methods unimatch --also channels_last=false
    python tools/benchmark.py --loader --config configs/pascal.yaml   # samples/s of each training stream

Every row (a method, or a method with `--also KEY=VALUE ...` overrides) gets the model, optimizer and
loaders training builds, and warm-up + N batches loaded into memory first (data loading is not timed).
The rows then take their steps in turn, one step each per round, so that a machine whose load changes
during the run slows every row alike; each row's time is the median of its N timed steps. Printed:
seconds per step, images per second, each row's time relative to the first row, and the 1-minute load
average over the timed rounds. On a GPU also the peak memory of each row's steps.

`--released-settings` (2 CPU threads) and `--voc-settings` (a GPU) build their configuration on a
generated dataset in a temporary folder. `--released-settings` also times each method as this project
ran it before issue 15 (`before`: NCHW tensors, the per-tensor SGD loop, whole ASPP kernels, the released
feature-perturbation pass) and prints the released code's times measured earlier (see RELEASED_SECONDS),
with two ratios to them: direct (fair only on a machine as quiet as then) and chained through `before`,
which was measured against the released code in that same earlier sitting (fair at any load). It also
counts each method's forward passes per step and how many reach a loss (tools/passes.py says how).
"""

import argparse
import importlib
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from unittest import mock

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.semseg.deeplabv3plus import AtrousConv2d  # noqa: E402
from tools.passes import count_passes  # noqa: E402
from util.config import load_config  # noqa: E402
from util.engine import Trainer, prepare_demo_data  # noqa: E402
from util.engine import trainer as trainer_module  # noqa: E402

# The released code's settings (UniMatch's Pascal config, with the ResNet-50 that UCCL and MLCL train)
# at a crop a 2-core CPU can step through: random init, 2 labeled + 2 unlabeled images per step.
RELEASED_SETTINGS = {
    "backbone": "resnet50", "deep_stem": True, "pretrained": None, "output_stride": 16,
    "dilations": [6, 12, 18], "nclass": 21, "crop_size": 129, "batch_size": 2, "lr": 0.001,
    "lr_multi": 10.0, "conf_thresh": 0.95, "criterion": "CELoss",
}  # fmt: skip
# Seconds per step at RELEASED_SETTINGS (2 threads, 8 timed steps after 2 warm-up), measured in one
# earlier sitting on the project's 2-core CPU machine: the authors' released code (not part of this
# repository), and this project as it was then (the `before` rows re-create it).
RELEASED_SECONDS = {"supervised": 0.62, "unimatch": 1.97, "UCCL": 3.37, "MLCL": 3.04}
EARLIER_SECONDS = {"supervised": 0.50, "unimatch": 1.94, "UCCL": 1.96, "MLCL": 2.24}
# This project before issue 15: NCHW tensors and the released FP pass (plus the per-tensor SGD loop and
# whole ASPP kernels, set in build_row).
BEFORE = ["channels_last=false", "unimatch.fp_labeled=true"]
# Pascal VOC's training settings on one GPU (R101, crop 321, batch 8), for GPU measurements.
VOC_SETTINGS = {**RELEASED_SETTINGS, "backbone": "resnet101", "crop_size": 321, "batch_size": 8}
SETTINGS = {"released": (RELEASED_SETTINGS, 160), "voc": (VOC_SETTINGS, 400)}  # (config, image size)


def settings_config(name: str, root: str, overrides: list[str]) -> dict:
    """The config of a settings preset over a small generated dataset in `root` (made on first use)."""
    values, size = SETTINGS[name]
    data = os.path.join(root, "demo")
    raw = {
        "dataset": "demo", "data_root": data, "epochs": 1, "num_workers": 0,
        "labeled_id_path": f"{data}/splits/labeled.txt", "unlabeled_id_path": f"{data}/splits/unlabeled.txt",
        "val_id_path": f"{data}/splits/val.txt",
        "demo": {"num_train": 24, "num_val": 2, "size": size, "labeled_fraction": 0.25},
        **values,
    }  # fmt: skip
    return config_with(raw, overrides, root)


def config_with(cfg: dict, overrides: list[str], root: str) -> dict:
    """`cfg` with `key=value` overrides applied and validated, as on the command line."""
    path = os.path.join(root, "benchmark.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return load_config(path, overrides)


def load_method(name: str):
    """`unimatch` -> the METHOD class of unimatch.py at the repository root."""
    module = importlib.import_module(name.removesuffix(".py"))
    return module.METHOD


def plain_sgd(groups: list[dict], cfg: dict) -> torch.optim.SGD:
    """The optimizer before issue 15: SGD's per-tensor loop."""
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


@dataclass
class Row:
    method: str
    label: str
    trainer: Trainer
    batches: list
    seconds: list = field(default_factory=list)
    peak_mb: float = 0.0


def build_row(method: str, cfg: dict, extra: list[str], root: str, count: int, before: bool = False) -> Row:
    method_cls = load_method(method)
    run_cfg = config_with(cfg, BEFORE + extra if before else extra, root) if before or extra else cfg
    if before:
        with mock.patch.object(trainer_module, "build_optimizer", plain_sgd):
            trainer = Trainer(method_cls, run_cfg, save_path=None)
        for net in trainer.networks.all.values():  # whole ASPP kernels, as before issue 15
            for module in net.modules():
                if isinstance(module, AtrousConv2d):
                    module.skip_padding_taps = False
    else:
        trainer = Trainer(method_cls, run_cfg, save_path=None)
    batches = []
    while len(batches) < count:
        for batch in trainer.batches(epoch=len(batches), start_batch=0):
            batches.append(batch)
            if len(batches) == count:
                break
    label = " ".join([method, *(["before"] if before else []), *extra])
    return Row(method, label, trainer, batches)


def timed_step(row: Row, batch: dict) -> float:
    device = row.trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    row.trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row.peak_mb = max(row.peak_mb, torch.cuda.max_memory_allocated(device) / 2**20)
    return time.perf_counter() - start


def run_rounds(rows: list[Row], warmup: int) -> list[float]:
    """Every row takes its steps in turn; returns the load averages seen during the timed rounds."""
    for row in rows:
        for net in row.trainer.trained_wrapped:
            net.train()
    loads = []
    for i in range(len(rows[0].batches)):
        for row in rows:
            seconds = timed_step(row, row.batches[i])
            if i >= warmup:
                row.seconds.append(seconds)
        if i >= warmup:
            loads.append(os.getloadavg()[0])
    return loads


def loader_rates(cfg: dict, samples: int) -> None:
    """Samples per second that one loader worker gives on each training stream (labeled, unlabeled,
    mix): one worker reads, decodes and augments its samples in turn, so this is its whole rate."""
    from util.data import TrainingData

    prepare_demo_data(cfg)
    data = TrainingData({**cfg, "num_workers": 0}, uses_unlabeled=True, pin_memory=False)
    print(f"\none loader worker per stream, {samples} samples each, crop {cfg['crop_size']}:")
    rates = []
    for name, loader in zip(("labeled", "unlabeled", "mix"), data.loaders):
        sampler_items = iter(loader.sampler)
        dataset = loader.dataset
        dataset[next(sampler_items)]  # first read: file system caches, lazy imports
        start = time.perf_counter()
        for _ in range(samples):
            dataset[next(sampler_items)]
        rate = samples / (time.perf_counter() - start)
        rates.append(rate)
        print(f"  {name:<10} {rate:8.1f} samples/s per worker")
    print(
        f"A step reads batch_size = {cfg['batch_size']} samples of each stream and each stream has "
        "num_workers workers, so a step of T seconds needs num_workers >= "
        f"{cfg['batch_size']} / (T x {min(rates):.1f}) for the slowest stream to keep up."
    )


def print_table(rows: list[Row], cfg: dict, loads: list[float], released: bool) -> None:
    first = statistics.median(rows[0].seconds)
    device = rows[0].trainer.device
    print(
        f"\nbatch_size {cfg['batch_size']}, crop {cfg['crop_size']}, {cfg['backbone']}, amp {cfg['amp']}, "
        f"{len(rows[0].seconds)} timed steps per row after {len(rows[0].batches) - len(rows[0].seconds)} "
        f"warm-up, rows in turn, {device}, {torch.get_num_threads()} threads, load average "
        f"{min(loads):.1f}-{max(loads):.1f} during the timed rounds"
    )
    header = f"{'row':<44} {'s/step':>7} {'img/s':>7} {'ratio':>6}"
    header += f" {'peak MB':>8}" if device.type == "cuda" else ""
    header += f" {'released s':>10} {'/released':>9} {'chained':>8}" if released else ""
    print(header)
    before = {row.method: statistics.median(row.seconds) for row in rows if " before" in row.label}
    for row in rows:
        seconds = statistics.median(row.seconds)
        images = cfg["batch_size"] * len(row.batches[0])  # a batch of each stream the method reads
        line = f"{row.label:<44} {seconds:7.3f} {images / seconds:7.1f} {seconds / first:6.2f}"
        line += f" {row.peak_mb:8.0f}" if device.type == "cuda" else ""
        if released and row.label == row.method and row.method in RELEASED_SECONDS:
            line += f" {RELEASED_SECONDS[row.method]:10.2f} {seconds / RELEASED_SECONDS[row.method]:9.2f}"
            if row.method in before:
                chained = (
                    seconds / before[row.method] * EARLIER_SECONDS[row.method] / RELEASED_SECONDS[row.method]
                )
                line += f" {chained:8.2f}"
        print(line)
    if device.type != "cuda":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(f"process peak resident memory, all rows together: {peak:.0f} MB")
    if released:
        print(
            "released s: the authors' released code at these settings, measured earlier on the project's "
            "2-core machine; /released: the direct ratio; chained: (row / its 'before' row, now) x "
            "(before / released, then), with before then = "
            + ", ".join(f"{k} {v:.2f} s" for k, v in EARLIER_SECONDS.items())
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--released-settings", action="store_true", help="the table of issue 15")
    preset.add_argument("--voc-settings", action="store_true", help="R101, crop 321, batch 8 (a GPU)")
    parser.add_argument("--methods", nargs="+", help="method script names")
    parser.add_argument("--iters", type=int, help="timed steps per row (default 20; presets 8)")
    parser.add_argument("--warmup", type=int, help="default 3; presets 2")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; presets 2)")
    parser.add_argument(
        "--also", nargs="+", action="append", default=[], metavar="KEY=VALUE",
        help="one more row per method with these overrides (repeatable)",
    )  # fmt: skip
    parser.add_argument("--before", action="store_true", help="a 'before' row per method (on with presets)")
    parser.add_argument("--loader", action="store_true", help="samples/s per loader worker, no training")
    parser.add_argument("--passes", action="store_true", help="count forward passes (on with presets)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. batch_size=4 amp=bf16")
    args = parser.parse_intermixed_args(argv)
    preset = args.released_settings or args.voc_settings
    if not preset and not args.config:
        parser.error("give --config, --released-settings or --voc-settings")
    methods = ["supervised", "unimatch", "UCCL", "MLCL"] if preset else ["supervised", "unimatch"]
    args.methods = args.methods or methods
    args.iters = args.iters or (8 if preset else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if preset else 3)
    args.threads = args.threads or (2 if args.released_settings else None)
    args.passes = args.passes or args.released_settings
    args.before = args.before or args.released_settings
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = settings_config("released" if args.released_settings else "voc", root, args.overrides)
        if args.loader:
            return loader_rates(cfg, samples=max(args.iters, 20))
        # Loading happens before timing, so workers only slow the start; keep it simple and in-process.
        cfg["num_workers"] = 0
        count = args.warmup + args.iters
        rows = []
        for name in args.methods:
            rows += [build_row(name, cfg, extra, root, count) for extra in [[]] + args.also]
            if args.before:
                rows.append(build_row(name, cfg, [], root, count, before=True))
        loads = run_rounds(rows, args.warmup)
        print_table(rows, cfg, loads, released=args.released_settings)
    if args.passes:
        print("\nforward passes of one step (tools/passes.py):")
        for name in args.methods:
            print(f"  {name:<12} {count_passes(load_method(name), cfg)}")
            if args.before and load_method(name).uses_unlabeled:
                before = {**cfg, "unimatch": {**cfg["unimatch"], "fp_labeled": True}}
                print(f"  {name + ' before':<12} {count_passes(load_method(name), before)}")
    return rows


if __name__ == "__main__":
    main()
