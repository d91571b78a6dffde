"""Runs CISCR.py's command line with test-only faults (the library carries no test hooks).

    python tests/run_ciscr.py [flags] --config C --save-path S [key=value ...]

Signals are TERM, INT, USR1 or KILL; each is sent by the process to itself, on rank --signal-rank (default
0) and on torchrun's first attempt only.

--signal-after-labels N SIG  sends SIG once the process has written its N-th pseudo-label
--wait-after-labels N   once the process has written its N-th pseudo-label, writes the file --ready-file and
                        waits (up to 60 s) until a stop signal has arrived: the test sends it from outside
--signal-in-eval STAGE SIG   sends SIG at the start of the last evaluation of training stage STAGE
--signal-in-ranking SIG      sends SIG when stage 3 first scores the pseudo-labels
--signal-after-stop SIG      sends SIG once the pipeline has said that it stopped, while it exits
--kill-in STAGE         with --kill-at N: SIGKILLs the process before iteration N of training stage STAGE
--dump-weights DIR      after each training stage, every rank writes its trained weights to
                        DIR/<stage>_rank<r>.pt, to compare ranks
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import CISCR  # noqa: E402
from tests.run_training import first_attempt, sigkill, signal_after_stop, wait_for_signal  # noqa: E402
from util import labelling  # noqa: E402
from util.engine import Trainer  # noqa: E402


def send(sig: str) -> None:
    if sig == "KILL":
        sigkill()
    os.kill(os.getpid(), getattr(signal, "SIG" + sig))


def after_labels(count: int, action) -> None:
    """Call action() once the process has written its count-th pseudo-label."""
    write_label, written = labelling.write_label, [0]

    def write_then_act(*a, **kw):
        write_label(*a, **kw)
        written[0] += 1
        if written[0] == count:
            action()

    labelling.write_label = write_then_act


def in_last_evaluation(stage: str, sig: str) -> None:
    evaluate = Trainer._evaluate_and_save

    def signal_then_evaluate(self, *a, **kw):
        if os.path.basename(self.save_path) == stage and self.iteration == self.progress.total_iters:
            send(sig)
        return evaluate(self, *a, **kw)

    Trainer._evaluate_and_save = signal_then_evaluate


def in_ranking(sig: str) -> None:
    reliability, sent = CISCR.reliability, []

    def signal_then_score(*a, **kw):
        if not sent:
            sent.append(sig)
            send(sig)
        return reliability(*a, **kw)

    CISCR.reliability = signal_then_score


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--signal-after-labels", nargs=2, metavar=("N", "SIG"))
    parser.add_argument("--wait-after-labels", type=int)
    parser.add_argument("--ready-file")
    parser.add_argument("--signal-in-eval", nargs=2, metavar=("STAGE", "SIG"))
    parser.add_argument("--signal-in-ranking", metavar="SIG")
    parser.add_argument("--signal-after-stop", metavar="SIG")
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--kill-in")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--dump-weights")
    args, rest = parser.parse_known_args()
    signalled = int(os.environ.get("RANK", 0)) == args.signal_rank and first_attempt()

    if args.signal_after_labels is not None and signalled:
        count, sig = args.signal_after_labels
        after_labels(int(count), lambda: send(sig))
    if args.wait_after_labels is not None and signalled:
        after_labels(args.wait_after_labels, lambda: wait_for_signal(args.ready_file))
    if args.signal_in_eval is not None and signalled:
        in_last_evaluation(*args.signal_in_eval)
    if args.signal_in_ranking is not None and signalled:
        in_ranking(args.signal_in_ranking)
    if args.signal_after_stop is not None:
        signal_after_stop(args.signal_after_stop)

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
