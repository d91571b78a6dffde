"""Runs CISCR.py's command line with test-only faults (the library carries no test hooks).

    python tests/run_ciscr.py [flags] --config C --save-path S [key=value ...]

--kill-after-labels N   SIGKILLs the process once it has written its N-th pseudo-label (rank 0, first torchrun
                        attempt only)
--kill-in STAGE         with --kill-at N: SIGKILLs the process before iteration N of training stage STAGE
--dump-weights DIR      after each training stage, every rank writes its trained weights to
                        DIR/<stage>_rank<r>.pt, to compare ranks
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import CISCR  # noqa: E402
from tests.run_training import first_attempt, sigkill  # noqa: E402
from util.engine import Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-labels", type=int)
    parser.add_argument("--kill-in")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--dump-weights")
    args, rest = parser.parse_known_args()
    rank = int(os.environ.get("RANK", 0))

    if args.kill_after_labels is not None and rank == 0 and first_attempt():
        write_label, written = CISCR.write_label, [0]

        def write_then_kill(*a, **kw):
            write_label(*a, **kw)
            written[0] += 1
            if written[0] == args.kill_after_labels:
                sigkill()

        CISCR.write_label = write_then_kill

    if args.kill_in is not None:
        train_step = Trainer.train_step

        def step_or_kill(self, batch):
            if os.path.basename(self.save_path) == args.kill_in and self.iteration == args.kill_at:
                sigkill()
            return train_step(self, batch)

        Trainer.train_step = step_or_kill

    if args.dump_weights:
        fit = Trainer.fit

        def fit_and_dump(self):
            best = fit(self)
            os.makedirs(args.dump_weights, exist_ok=True)
            stage = os.path.basename(self.save_path)
            path = os.path.join(args.dump_weights, f"{stage}_rank{self.dist.rank}.pt")
            torch.save(self.model_without_ddp.state_dict(), path)
            return best

        Trainer.fit = fit_and_dump

    CISCR.main(rest)


if __name__ == "__main__":
    main()
