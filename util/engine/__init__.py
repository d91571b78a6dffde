"""The training engine, written once for every method.

A method script defines a `Method` subclass: the networks it declares (`networks()`), its `step(batch)`
returning weighted loss terms, and whatever state it carries. The engine owns what is the same for all
methods, in parts:

- trainer.py     Trainer, the loop: process group, seeds, loaders, one optimizer, poly schedule, autocast,
                 the step, logging, when to evaluate and save; the output folder and data checked first
- device.py      networks on the device (DDP, SyncBN, channels_last, compile), batches, the autocast dtype
- evaluation.py  Evaluator (the networks the method names, the best score, best.pth's contents) and
                 RankBatchNorm (CPU ranks' own BatchNorm statistics, averaged before evaluating and saving)
- saving.py      TrainingState (what latest.pth holds, restore, resume) and Saver (latest.pth /
                 previous.pth / best.pth / evals.jsonl, atomic, resumable; the save path's lock)
- progress.py    Progress (iterations) and RunClock (seconds since iteration 0, across resumes)
- guard.py       the non-finite guard: a step with a NaN/Inf loss or gradient is skipped on every rank alike
- logbook.py     text log, TensorBoard, evals.jsonl
- rng.py         seeds and every rank's random states
- stop.py        SIGTERM / SIGINT / SIGUSR1: stop after the current step, on every rank alike
- run.py         the command line and the exit status of each fault
- method.py      Method and Networks
"""

from util.engine.device import AMP_DTYPES, amp_dtype
from util.engine.guard import NonFiniteError
from util.engine.method import Method, Networks
from util.engine.run import (
    EXIT_BAD_INPUT,
    EXIT_NONFINITE,
    EXIT_REQUEUE,
    EXIT_SAVE_FAILED,
    build_trainer,
    main,
    parse_args,
    run,
)
from util.engine.trainer import Trainer, poly_lr, prepare_demo_data

__all__ = [
    "AMP_DTYPES",
    "EXIT_BAD_INPUT",
    "EXIT_NONFINITE",
    "EXIT_REQUEUE",
    "EXIT_SAVE_FAILED",
    "Method",
    "Networks",
    "NonFiniteError",
    "Trainer",
    "amp_dtype",
    "build_trainer",
    "main",
    "parse_args",
    "poly_lr",
    "prepare_demo_data",
    "run",
]
