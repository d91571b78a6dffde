"""The training engine, written once for every method.

A method script defines a `Method` subclass: the networks it declares (`networks()`), its `step(batch)`
returning weighted loss terms, and whatever state it carries. The engine owns what is the same for all
methods, in parts:

- trainer.py  the loop: process group, seeds, loaders, DDP, one optimizer, poly schedule, autocast, the
              step, logging, evaluation of the networks the method names
- guard.py    the non-finite guard: a step with a NaN/Inf loss or gradient is skipped on every rank alike
- saving.py   latest.pth / previous.pth / best.pth / evals.jsonl, atomic, resumable
- rng.py      seeds and every rank's random states
- stop.py     SIGTERM / SIGINT / SIGUSR1: stop after the current step, on every rank alike
- run.py      the command line and the exit status of each fault
- method.py   Method and Networks
"""

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
from util.engine.trainer import AMP_DTYPES, Trainer, poly_lr, prepare_demo_data

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
    "build_trainer",
    "main",
    "parse_args",
    "poly_lr",
    "prepare_demo_data",
    "run",
]
