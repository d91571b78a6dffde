"""Entry point of every method script: arguments, config, the Trainer, and an exit status for each fault.

Exit statuses (docs/fault-tolerance.md): 2 a config, data file or checkpoint that cannot be used (named
in the message); 3 too many non-finite steps in a row; 4 the final checkpoint could not be written; 75 stopped
by a signal with latest.pth written: run the same command again (a scheduler may requeue the job). Any other
exception is a bug and keeps its traceback. The stop signals are caught from the start of run() to the end of
the process once a stop is under way, so 75 is final: a second signal while it exits is noted and ignored.
"""

import argparse
import logging
import sys

from dataset.semi import DataError
from util import checkpoint as ckpt
from util.config import ConfigError, load_config
from util.dist import cleanup
from util.engine.guard import NonFiniteError
from util.engine.stop import StopRequested, end_workers, process_stop
from util.engine.trainer import Trainer

logger = logging.getLogger("semiseg")

EXIT_BAD_INPUT = 2  # config, data file or checkpoint: fix the input; nothing to resume would help
EXIT_NONFINITE = 3  # a run of non-finite steps; latest.pth holds the last good state
EXIT_SAVE_FAILED = 4  # the final checkpoint could not be written; latest.pth holds the last good one
# Stopped by SIGTERM/SIGINT/SIGUSR1 with latest.pth written: "requeue me". 75 is EX_TEMPFAIL of sysexits.h
# ("temporary failure; the user is invited to retry"), and what SLURM's RequeueExit or a Kubernetes
# podFailurePolicy can be told to retry.
EXIT_REQUEUE = 75


def parse_args(argv=None, description: str = ""):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--labeled-id-path", help="split file of labeled images (overrides the config)")
    parser.add_argument("--unlabeled-id-path", help="split file of unlabeled images (overrides the config)")
    parser.add_argument("--save-path", required=True, help="folder for checkpoints, logs and TensorBoard")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lr=0.002 amp=bf16")
    return parser.parse_intermixed_args(argv)


def build_trainer(method_cls, config: str, save_path: str, overrides=()) -> "Trainer":
    """Load and check the config and build the Trainer; a bad input exits with status 2 and a message."""
    try:
        cfg = load_config(config, list(overrides))
        return Trainer(method_cls, cfg, save_path, source=config)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        cleanup()
        sys.exit(EXIT_BAD_INPUT)


def run(trainer: "Trainer") -> float:
    """trainer.fit(), turning the faults it reports into a message and an exit status (see above). `trainer`
    is a Trainer or anything with its fit() and dist (CISC-R's staged pipeline)."""
    stop = process_stop()
    stop.install()  # a signal from here on stops the run after the unit of work it is in
    try:
        best = trainer.fit()
        if stop.requested and trainer.dist.is_main:
            logger.warning(f"{stop.describe()} came during the last unit of work: the run is complete")
        return best
    except StopRequested as err:
        if trainer.dist.is_main:  # every rank stopped at the same iteration: one message
            logger.warning(str(err))
        cleanup()
        sys.exit(EXIT_REQUEUE)
    except (ConfigError, ckpt.CheckpointError, DataError, NonFiniteError, ckpt.SaveError) as err:
        if isinstance(err, NonFiniteError):
            code = EXIT_NONFINITE
        elif isinstance(err, ckpt.SaveError):
            code = EXIT_SAVE_FAILED
        else:
            code = EXIT_BAD_INPUT
        # Every rank agrees on a non-finite stop: one message is enough. Other faults can be one rank's.
        if trainer.dist.is_main or not isinstance(err, NonFiniteError):
            rank = f" (rank {trainer.dist.rank})" if trainer.dist.distributed else ""
            logger.error(f"error{rank}: {_message(err)}")
        cleanup()
        sys.exit(code)
    finally:
        cleanup()
        end_workers()
        stop.restore()  # kept installed when a stop is under way (GracefulStop.restore)


def _message(err: Exception) -> str:
    """The message of an error; for one raised in a loader worker, without the worker's traceback."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip() + " (raised in a data loader worker)"
    return text


def main(method_cls, argv=None) -> float:
    """Entry point of every method script: `torchrun ... METHOD.py --config ... --save-path ...`."""
    args = parse_args(argv, description=method_cls.__doc__ or "")
    overrides = list(args.overrides)
    if args.labeled_id_path:
        overrides.append(f"labeled_id_path={args.labeled_id_path}")
    if args.unlabeled_id_path:
        overrides.append(f"unlabeled_id_path={args.unlabeled_id_path}")
    return run(build_trainer(method_cls, args.config, args.save_path, overrides))
