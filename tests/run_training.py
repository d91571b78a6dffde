"""Runs a method script's training the way its entry point does, with two test-only extras.

    python tests/run_training.py unimatch --config C --save-path S [--crash-at N] [--dump-weights DIR]

--crash-at N  ends the process abruptly (os._exit) right after iteration N, like a killed job.
--dump-weights DIR  writes every rank's final weights to DIR/rank<r>.pt, to compare ranks.
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util.config import load_config  # noqa: E402
from util.dist import cleanup  # noqa: E402
from util.engine import Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--config", required=True)
    parser.add_argument("--save-path", required=True)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--dump-weights")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    method_cls = importlib.import_module(args.method).METHOD
    trainer = Trainer(method_cls, load_config(args.config, args.overrides), args.save_path)
    if args.crash_at is not None:
        train_step = trainer.train_step

        def crashing_step(batch):
            if trainer.iteration == args.crash_at:
                os._exit(17)
            return train_step(batch)

        trainer.train_step = crashing_step
    trainer.fit()
    if args.dump_weights:
        os.makedirs(args.dump_weights, exist_ok=True)
        torch.save(
            trainer.model_without_ddp.state_dict(),
            os.path.join(args.dump_weights, f"rank{trainer.dist.rank}.pt"),
        )
    cleanup()


if __name__ == "__main__":
    main()
