"""Runs a method script's training the way its entry point does, with test-only fault injection.

    python tests/run_training.py unimatch --config C --save-path S [flags] [key=value ...]

Exit statuses are those of the entry scripts (util.engine.run). The flags below exist only here, so
that the library carries no test hooks:

--crash-at N          ends the process abruptly (os._exit(17)) before iteration N, like a killed job.
--kill-at N           SIGKILLs the process before iteration N, on the rank given by --kill-rank (default
                      0), and only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0).
--kill-in-save K      SIGKILLs the process in the middle of its K-th checkpoint write (1-based), after
                      half of the temporary file is on disk.
--nan-at N            from iteration N on, for --nan-steps steps (default 1), on rank --nan-rank (default
                      0), makes loss term --nan-term (default: the first) non-finite: --nan-kind loss adds
                      a NaN constant to its value (the gradients stay finite), --nan-kind grad turns its
                      gradient into NaN (the value stays finite).
--fsize-limit-at N    before iteration N, limits the size of any file this process writes to
                      --fsize-limit bytes (RLIMIT_FSIZE; writes beyond it fail with EFBIG, like a full disk).
--signal-at N SIG     sends signal SIG (TERM, INT, USR1) to this process before iteration N, on rank
                      --signal-rank (default 0), on torchrun's first attempt only.
--signal-in-save K SIG  sends SIG to this process in the middle of its K-th checkpoint write.
--wait-at N           before iteration N, on rank --wait-rank (default 0), writes the file --ready-file and
                      waits (up to 60 s) until a stop signal has arrived: the test sends it from outside.
--signal-after-stop SIG  sends SIG to this process once it has said that it stopped (after "stopped by"),
                      while it exits.
--dump-weights DIR    writes every rank's final weights to DIR/rank<r>.pt, to compare ranks.
"""

import argparse
import importlib
import io
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util.engine import build_trainer, run  # noqa: E402
from util.engine.stop import process_stop  # noqa: E402

engine_run = importlib.import_module("util.engine.run")  # the module (util.engine.run is its function)


def first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def sigkill():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def before_step(trainer, hook):
    """Call hook(iteration) before every training step."""
    train_step = trainer.train_step

    def step(batch):
        hook(trainer.iteration)
        return train_step(batch)

    trainer.train_step = step


def inject_nan(trainer, args):
    method_step = trainer.method.step
    last = args.nan_at + args.nan_steps

    def step(batch):
        losses, stats = method_step(batch)
        if trainer.dist.rank == args.nan_rank and args.nan_at <= trainer.iteration < last:
            name = args.nan_term or next(iter(losses))
            if args.nan_kind == "loss":
                losses[name] = losses[name] + torch.tensor(float("nan"), device=losses[name].device)
            else:
                losses[name].register_hook(lambda grad: grad * float("nan"))
        return losses, stats

    trainer.method.step = step


def in_save(count, action):
    """Run action() in the middle of the count-th torch.save, with half of the file on disk; the write then
    goes on (unless action ended the process)."""
    real_save = torch.save
    calls = [0]

    def save(obj, f, *a, **kw):
        calls[0] += 1
        if calls[0] != count:
            return real_save(obj, f, *a, **kw)
        buffer = io.BytesIO()
        real_save(obj, buffer, *a, **kw)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        action()
        f.write(data[len(data) // 2 :])

    torch.save = save


def wait_for_signal(ready_file):
    """Tell the test that this process is waiting, then wait until the stop signal it sends has arrived."""
    with open(ready_file, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not process_stop().requested and time.monotonic() < deadline:
        time.sleep(0.01)


def signal_after_stop(sig: str) -> None:
    """Send SIG to this process in the first cleanup after the run said it stopped, while it exits."""
    cleanup, sent = engine_run.cleanup, []

    def signal_then_cleanup():
        if process_stop().requested and not sent:
            sent.append(sig)
            os.kill(os.getpid(), getattr(signal, "SIG" + sig))
        cleanup()

    engine_run.cleanup = signal_then_cleanup


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--config", required=True)
    parser.add_argument("--save-path", required=True)
    parser.add_argument("--crash-at", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--kill-rank", type=int, default=0)
    parser.add_argument("--kill-in-save", type=int)
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--nan-steps", type=int, default=1)
    parser.add_argument("--nan-rank", type=int, default=0)
    parser.add_argument("--nan-term")
    parser.add_argument("--nan-kind", choices=("loss", "grad"), default="loss")
    parser.add_argument("--fsize-limit-at", type=int)
    parser.add_argument("--fsize-limit", type=int, default=1 << 16)
    parser.add_argument("--signal-at", nargs=2, metavar=("N", "SIG"))
    parser.add_argument("--signal-rank", type=int, default=0)
    parser.add_argument("--signal-in-save", nargs=2, metavar=("K", "SIG"))
    parser.add_argument("--wait-at", type=int)
    parser.add_argument("--wait-rank", type=int, default=0)
    parser.add_argument("--ready-file")
    parser.add_argument("--signal-after-stop", metavar="SIG")
    parser.add_argument("--dump-weights")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    method_cls = importlib.import_module(args.method).METHOD
    trainer = build_trainer(method_cls, args.config, args.save_path, args.overrides)
    rank = trainer.dist.rank

    if args.crash_at is not None:
        before_step(trainer, lambda it: os._exit(17) if it == args.crash_at else None)
    if args.kill_at is not None and rank == args.kill_rank and first_attempt():
        before_step(trainer, lambda it: sigkill() if it == args.kill_at else None)
    if args.kill_in_save is not None:
        in_save(args.kill_in_save, sigkill)
    if args.signal_at is not None and rank == args.signal_rank and first_attempt():
        at, sig = int(args.signal_at[0]), getattr(signal, "SIG" + args.signal_at[1])
        before_step(trainer, lambda it, at=at, sig=sig: os.kill(os.getpid(), sig) if it == at else None)
    if args.signal_in_save is not None:
        again = getattr(signal, "SIG" + args.signal_in_save[1])
        in_save(int(args.signal_in_save[0]), lambda: os.kill(os.getpid(), again))
    if args.wait_at is not None and rank == args.wait_rank:
        before_step(trainer, lambda it: wait_for_signal(args.ready_file) if it == args.wait_at else None)
    if args.signal_after_stop is not None:
        signal_after_stop(args.signal_after_stop)
    if args.nan_at is not None:
        inject_nan(trainer, args)
    if args.fsize_limit_at is not None:

        def limit(it):
            if it == args.fsize_limit_at:
                resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, resource.RLIM_INFINITY))

        before_step(trainer, limit)

    run(trainer)
    if args.dump_weights:
        os.makedirs(args.dump_weights, exist_ok=True)
        nets = trainer.networks.all
        state = (
            trainer.model_without_ddp.state_dict()
            if len(nets) == 1
            else {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}
        )
        torch.save(state, os.path.join(args.dump_weights, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
