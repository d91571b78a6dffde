"""Time training steps of one or more method scripts at one config, in one run.

    python tools/benchmark.py --config configs/demo.yaml --methods supervised unimatch --iters 20
    python tools/benchmark.py --released-settings          # the released code's settings on generated data
    python tools/benchmark.py --released-settings --also channels_last=true --also compile=true
    python tools/benchmark.py --loader --config configs/pascal.yaml   # samples/s of each training stream

For each method it builds the same model, optimizer and loaders as training does, loads warm-up + N
batches into memory first (so data loading is not timed), runs the warm-up steps, then times N steps and
prints seconds per iteration, images per second and peak memory, with each method's time relative to
the first one. Memory is the CUDA allocator's peak on a GPU, the process's peak resident size on a CPU.
Each `--also OVERRIDES` adds a line per method with those config overrides (a variant of the same run).

`--released-settings` (CPU) and `--voc-settings` (GPU) build their configuration on a generated dataset
in a temporary folder; `--released-settings` also prints the released code's times measured earlier on
the project's 2-core machine and, per method, the forward passes of a step and how many reach a loss
(tools/passes.py says how they are counted).
"""

import argparse
import gc
import importlib
import os
import resource
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.passes import count_passes  # noqa: E402
from util.config import load_config  # noqa: E402
from util.engine import Trainer, prepare_demo_data  # noqa: E402

# The released code's settings (UniMatch's Pascal config, with the ResNet-50 that UCCL and MLCL train)
# at a crop a 2-core CPU can step through: random init, 2 labeled + 2 unlabeled images per step.
RELEASED_SETTINGS = {
    "backbone": "resnet50", "deep_stem": True, "pretrained": None, "output_stride": 16,
    "dilations": [6, 12, 18], "nclass": 21, "crop_size": 129, "batch_size": 2, "lr": 0.001,
    "lr_multi": 10.0, "conf_thresh": 0.95, "criterion": "CELoss",
}  # fmt: skip
# Seconds per step of the authors' released code at RELEASED_SETTINGS (2 threads, 8 timed steps after 2),
# measured earlier on the project's 2-core CPU machine; that code is not part of this repository.
RELEASED_SECONDS = {"supervised": 0.62, "unimatch": 1.97, "UCCL": 3.37, "MLCL": 3.04}
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
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return load_config(path, overrides)


def load_method(name: str):
    """`unimatch` -> the METHOD class of unimatch.py at the repository root."""
    module = importlib.import_module(name.removesuffix(".py"))
    return module.METHOD


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def images_per_step(method, batch_size: int) -> int:
    # Labeled images, plus the unlabeled and mix images a semi-supervised step reads.
    return batch_size * (3 if method.uses_unlabeled else 1)


def load_batches(trainer: Trainer, count: int) -> list:
    batches = []
    while len(batches) < count:
        for batch in trainer.batches(epoch=len(batches), start_batch=0):
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def benchmark(method_cls, cfg: dict, iters: int, warmup: int) -> dict:
    trainer = Trainer(method_cls, cfg, save_path=None)
    batches = load_batches(trainer, warmup + iters)
    device = trainer.device
    for net in trainer.trained_wrapped:
        net.train()
    for batch in batches[:warmup]:
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    result = {
        "s_per_iter": seconds,
        "images_per_s": images_per_step(method_cls, cfg["batch_size"]) / seconds,
        "peak_mb": peak_memory_mb(device),
        "device": str(device),
        "load": (load + os.getloadavg()[0]) / 2,
    }
    del trainer, batches
    gc.collect()
    return result


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


def print_table(rows: list, cfg: dict, args, with_released: bool) -> None:
    first = rows[0][1]
    print(
        f"\nbatch_size {cfg['batch_size']}, crop {cfg['crop_size']}, {cfg['backbone']}, amp {cfg['amp']}, "
        f"{args.iters} timed iterations after {args.warmup} warm-up, {first['device']}, "
        f"{torch.get_num_threads()} threads"
    )
    header = f"{'method':<34} {'s/iter':>7} {'img/s':>7} {'peak MB':>8} {'ratio':>6} {'load':>5}"
    if with_released:
        header += f" {'released s':>10} {'/released':>9}"
    print(header)
    for label, r in rows:
        line = (
            f"{label:<34} {r['s_per_iter']:7.3f} {r['images_per_s']:7.1f} {r['peak_mb']:8.0f} "
            f"{r['s_per_iter'] / first['s_per_iter']:6.2f} {r['load']:5.1f}"
        )
        released = RELEASED_SECONDS.get(label)
        if with_released and released:
            line += f" {released:10.2f} {r['s_per_iter'] / released:9.2f}"
        print(line)
    if with_released:
        print(
            "released s: the authors' released code at these settings, measured earlier on the project's "
            "2-core CPU machine (2 threads, 8 timed steps after 2); load: 1-minute load average."
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
    parser.add_argument("--iters", type=int, help="timed iterations per method (default 20; presets 8)")
    parser.add_argument("--warmup", type=int, help="default 3; presets 2")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; presets 2)")
    parser.add_argument(
        "--also", nargs="+", action="append", default=[], metavar="KEY=VALUE",
        help="one more line per method with these overrides (repeatable)",
    )  # fmt: skip
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
        variants = [[]] + args.also
        rows = []
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        for name in args.methods:
            for extra in variants:
                run_cfg = load_config_overrides(cfg, extra, root)
                label = " ".join([name, *extra])
                rows.append((label, benchmark(load_method(name), run_cfg, args.iters, args.warmup)))
        print_table(rows, cfg, args, with_released=args.released_settings)
    if args.passes:
        print("\nforward passes of one step (tools/passes.py):")
        for name in args.methods:
            print(f"  {name:<12} {count_passes(load_method(name), cfg)}")
    return rows


def load_config_overrides(cfg: dict, overrides: list[str], root: str) -> dict:
    """`cfg` with `key=value` overrides applied and validated, as on the command line."""
    if not overrides:
        return cfg
    path = os.path.join(root, "variant.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return load_config(path, overrides)


if __name__ == "__main__":
    main()
