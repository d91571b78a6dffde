"""Time training steps of one or more method scripts at one config, in one run.

    python tools/benchmark.py --config configs/demo.yaml --methods supervised unimatch --iters 20

For each method it builds the same model, optimizer and loaders as training does, loads warm-up + N
batches into memory first (so data loading is not timed), runs the warm-up steps, then times N steps and
prints seconds per iteration, images per second and peak memory, with each method's time relative to
the first one. Memory is the CUDA allocator's peak on a GPU, the process's peak resident size on a CPU.
"""

import argparse
import gc
import importlib
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.config import load_config  # noqa: E402
from util.engine import Trainer  # noqa: E402


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


def benchmark(method_cls, cfg: dict, iters: int, warmup: int) -> dict:
    trainer = Trainer(method_cls, cfg, save_path=None)
    batches = []
    while len(batches) < warmup + iters:
        for batch in trainer.batches(epoch=len(batches), start_batch=0):
            batches.append(batch)
            if len(batches) == warmup + iters:
                break
    device = trainer.device
    for net in trainer.trained_wrapped:
        net.train()
    for batch in batches[:warmup]:
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
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
    }
    del trainer, batches
    gc.collect()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--methods", nargs="+", default=["supervised", "unimatch"], help="method script names"
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. batch_size=4 amp=bf16")
    args = parser.parse_intermixed_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    # Loading happens before timing, so workers only slow the start; keep it simple and in-process.
    cfg["num_workers"] = 0
    rows = []
    for name in args.methods:
        rows.append((name, benchmark(load_method(name), cfg, args.iters, args.warmup)))
    base = rows[0][1]["s_per_iter"]
    print(
        f"\n{args.config}: batch_size {cfg['batch_size']}, crop {cfg['crop_size']}, {cfg['backbone']}, "
        f"amp {cfg['amp']}, {args.iters} timed iterations after {args.warmup} warm-up, {rows[0][1]['device']}"
    )
    print(f"{'method':<12} {'s/iter':>8} {'img/s':>8} {'peak MB':>9} {'ratio':>6}")
    for name, r in rows:
        print(
            f"{name:<12} {r['s_per_iter']:8.3f} {r['images_per_s']:8.1f} {r['peak_mb']:9.0f} "
            f"{r['s_per_iter'] / base:6.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
