"""Graceful stop: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 end the training after the step it is in.

Schedulers send SIGTERM some time before they kill a job (SLURM at preemption, Kubernetes, torchrun passing
on its own); SIGUSR1 is the one to ask SLURM for ahead of the time limit (`--signal=USR1@180`). The handler
only notes the signal. The trainer shares the note in the all-reduce its non-finite guard makes at every step
(no extra collective), so every rank stops after the same step; rank 0 then writes latest.pth and every rank
exits with EXIT_REQUEUE. Signals that come while it stops are reported and ignored, so that a second Ctrl-C
cannot interrupt the save (SIGKILL still can; the save is atomic either way).
"""

import multiprocessing
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequested(Exception):
    """The run stopped on a signal after writing latest.pth; the same command continues it."""


class GracefulStop:
    def __init__(self, label: str = ""):
        self.label = label  # e.g. "rank 1: ", in the notes written when a signal comes
        self.signal: int | None = None  # the first stop signal this process received
        self.agreed = False  # set by the trainer at each step: some rank received one
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def describe(self) -> str:
        if self.signal is None:
            return "a signal to another rank"
        return signal.Signals(self.signal).name

    def install(self) -> None:
        """Catch the stop signals (Python delivers signals to the main thread only; elsewhere: no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        # Written straight to stderr: the signal may have interrupted a logging call holding its lock.
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            note = f"{name}: stopping after the current step, then writing latest.pth"
        else:
            note = f"{name} again: ignored, still stopping (latest.pth is written atomically)"
        os.write(2, f"\n{self.label}{note}\n".encode())


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
