"""How far a run is: its iterations, and its seconds since iteration 0 (kept across resumes)."""

import time
from dataclasses import dataclass


@dataclass
class Progress:
    """The loop's counters; checkpoints hold `iteration` and `scaler_skips`."""

    total_iters: int
    iters_per_epoch: int
    iteration: int = 0  # steps taken, skipped ones included: the iteration of the next step
    scaler_skips: int = 0  # fp16 steps the GradScaler skipped for an overflow (its normal business)


class RunClock:
    """Seconds since iteration 0, across resumes: a resumed run continues from the checkpoint's counts."""

    def __init__(self):
        self.train_seconds = 0.0  # wall-clock spent in training steps (evaluations excluded)
        self.wall_seconds_before = 0.0  # wall-clock of the run before this process started
        self.wall_start = time.time()
        self.timed_from = 0  # the first iteration train_seconds counts

    def start(self) -> None:
        """This process's wall-clock counts from now."""
        self.wall_start = time.time()

    def wall_seconds(self) -> float:
        """Wall-clock seconds of the run since iteration 0: this process's and, after a resume, those of
        the processes before it up to the checkpoint it resumed from."""
        return self.wall_seconds_before + time.time() - self.wall_start

    def timing(self, iteration: int) -> dict:
        """Seconds per training step, and the training and wall-clock seconds since iteration 0."""
        return {
            "seconds_per_iter": self.train_seconds / max(iteration - self.timed_from, 1),
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds(),
        }

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "wall_seconds": self.wall_seconds()}

    def load_state_dict(self, state: dict, iteration: int) -> None:
        """`state` of a checkpoint at `iteration`; one from before the run's seconds were kept counts them
        from that iteration on."""
        self.train_seconds = state.get("train_seconds", 0.0)
        self.timed_from = 0 if "train_seconds" in state else iteration
        self.wall_seconds_before, self.wall_start = state.get("wall_seconds", 0.0), time.time()
