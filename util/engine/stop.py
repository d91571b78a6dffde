"""Graceful stop: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 end the run after the unit of work it is in.

Schedulers send SIGTERM some time before they kill a job (SLURM at preemption, Kubernetes, torchrun passing
on its own); SIGUSR1 is the one to ask SLURM for ahead of the time limit (`--signal=USR1@180`). A process
has one GracefulStop (process_stop()); the entry point (util.engine.run) installs it for the whole run, so
a signal is noted whatever the run is doing: a training step, an evaluation, or the work between CISC-R's
training stages (pseudo-labels, ranking). The handler only notes the signal. Each unit of work looks at
the note when it ends: the trainer shares it in the all-reduce its non-finite guard makes at every step (no
extra collective), other work calls agree() where the ranks meet anyway, so every rank stops at the same
point; what the work wrote is kept and every rank exits with EXIT_REQUEUE. Signals that come while it
stops are reported and ignored, and once it exits they are ignored outright, so that a second Ctrl-C can
interrupt neither the save nor the exit (SIGKILL still can; every save is atomic either way).
"""

import contextlib
import multiprocessing
import os
import signal
import threading

import torch

from util.dist import all_reduce_sum

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequested(Exception):
    """The run stopped on a signal with what it had done kept (latest.pth, pseudo-labels); the same command
    continues it."""


class GracefulStop:
    def __init__(self, label: str = ""):
        self.label = label  # e.g. "rank 1: ", in the notes written when a signal comes
        self.signal: int | None = None  # the first stop signal this process received
        self.agreed = False  # some rank received one (the trainer's step, agree())
        self._previous: dict = {}  # the handlers install() replaced
        self._installs = 0  # install() calls not yet undone by restore()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def describe(self) -> str:
        if self.signal is None:
            return "a signal to another rank"
        return signal.Signals(self.signal).name

    def install(self) -> None:
        """Catch the stop signals (Python delivers signals to the main thread only; elsewhere: no-op).
        Calls nest: the entry point installs for the whole run, a Trainer again for its training."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._installs += 1
        if not self._previous:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        """Undo install(). The outermost one puts the old handlers back, unless a stop is under way: then
        the process is about to exit, and the stop signals are ignored until it has (a handler would not
        do: Python puts its own handlers back to the default while it shuts down, which can take seconds;
        an ignored signal stays ignored), so that its exit status stays 75."""
        if self._installs == 0:
            return
        self._installs -= 1
        if self._installs > 0:
            return
        stopping = self.requested or self.agreed
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
        self._previous.clear()

    @contextlib.contextmanager
    def installed(self):
        self.install()
        try:
            yield self
        finally:
            self.restore()

    def agree(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal; a collective, called by every rank at the same point."""
        flag = all_reduce_sum(torch.tensor([float(self.requested)], device=device))
        self.agreed = bool(flag.item() > 0)
        return self.agreed

    def _note(self, signum: int, frame) -> None:
        # Written straight to stderr: the signal may have interrupted a logging call holding its lock.
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            note = f"{name}: stopping after the current step; what is done is kept"
        else:
            note = f"{name} again: ignored, still stopping (every save is atomic)"
        os.write(2, f"\n{self.label}{note}\n".encode())


_PROCESS_STOP: GracefulStop | None = None


def process_stop() -> GracefulStop:
    """This process's GracefulStop, shared by the entry point, the trainer and CISC-R's pipeline."""
    global _PROCESS_STOP
    if _PROCESS_STOP is None:
        distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1  # torchrun's, as util.dist reads them
        _PROCESS_STOP = GracefulStop(f"rank {os.environ.get('RANK', 0)}: " if distributed else "")
    return _PROCESS_STOP


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data loader worker's `worker_init_fn`. Ctrl-C reaches the whole process group, and some schedulers
    signal every process of a job (SLURM); a loader worker that died of it would end the training before it
    could stop cleanly. A worker ends when its loader is closed, or with the training process (end_workers).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_workers() -> None:
    """Kill the loader workers still up when the training process ends (after an error): they ignore SIGTERM,
    by which multiprocessing would end them at exit, and it would then wait for them forever."""
    children = multiprocessing.active_children()
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a failure
    for child in children:
        child.kill()
        child.join()
