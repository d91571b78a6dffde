"""Where training state goes on disk: latest.pth (+ previous.pth), best.pth, config.yaml, evals.jsonl; and
what latest.pth holds (TrainingState).

Rank 0 writes; every write is atomic (util.files). A write that fails (disk full, file too large, folder
gone) is logged and retried at the next save, and the run ends with a SaveError if the last one failed.
One run at a time per save path: rank 0 holds a lock on save_path/.lock (lock_save_path).
"""

import json
import logging
import os
from dataclasses import dataclass

import torch
import yaml

from util import checkpoint as ckpt
from util.config import ConfigError, config_changes
from util.dist import DistInfo, all_gather_objects, broadcast_object
from util.engine.device import to_device
from util.engine.evaluation import Evaluator, RankBatchNorm
from util.engine.guard import NonFiniteGuard
from util.engine.method import Method, Networks
from util.engine.progress import Progress, RunClock
from util.engine.rng import rng_state, set_rng_state
from util.files import write_atomic
from util.lock import LockHeld, lock

logger = logging.getLogger("semiseg")


class Saver:
    def __init__(self, save_path: str | None, is_main: bool):
        self.save_path = save_path
        self.is_main = is_main
        self.failed: dict[str, str] = {}  # file name -> why its last write failed
        self.saved_iteration: int | None = None  # the iteration latest.pth holds

    def path(self, name: str) -> str | None:
        return os.path.join(self.save_path, name) if self.save_path else None

    def save(self, name: str, state: dict, iteration: int, previous: str | None = None) -> bool:
        """Rank 0 writes save_path/name atomically (keeping the old file as `previous` when given).

        Returns False, with the path and the OS error logged, when the write failed; the file on disk then
        stays as it was and the next save tries again.
        """
        if not self.is_main or self.save_path is None:
            return True
        path = self.path(name)
        try:
            ckpt.save_atomic(state, path, previous=self.path(previous) if previous else None)
        except OSError as err:
            self.failed[name] = f"{path}: {err.strerror or err}"
            kept = "the previous file is kept" if os.path.isfile(path) else "there is no earlier file"
            logger.error(
                f"could not write checkpoint {path} at iteration {iteration}: {type(err).__name__}: "
                f"{err.strerror or err}; {kept}, training goes on and the next save tries again"
            )
            return False
        self.failed.pop(name, None)
        return True

    def save_latest(self, state: dict, iteration: int) -> None:
        """latest.pth, with the one it replaces kept as previous.pth."""
        if self.save("latest.pth", state, iteration, previous="previous.pth"):
            self.saved_iteration = iteration

    def check_final(self) -> None:
        if self.failed:
            raise ckpt.SaveError(
                "training finished but its last checkpoint could not be written: "
                + "; ".join(self.failed.values())
                + ". The files on disk are the last good ones; free space and run the same command again "
                "to finish from them."
            )

    def find_resumable(self) -> tuple[str | None, dict | None]:
        """The checkpoint to resume from: latest.pth, or previous.pth when latest.pth is unusable.

        Rank 0 picks the file and tells the others (each rank then loads it itself). A damaged latest.pth
        (truncated, corrupted, pickled code, not a training checkpoint) is reported and renamed aside to
        latest.pth.corrupt, never deleted; when no file is usable this raises a CheckpointError naming them
        all rather than starting over.
        """
        if self.save_path is None:
            return None, None
        found, state = None, None
        if self.is_main:
            for tmp in ckpt.remove_stale_temporaries(self.save_path):
                logger.info(f"removed {tmp}, left by a save that was interrupted")
            path, state, problems = ckpt.find_resumable(self.save_path)
            found = (path, problems)
        path, problems = broadcast_object(found)
        for bad, reason in problems if self.is_main else ():
            logger.warning(f"cannot resume from {bad}: {reason}")
        if path is None:
            if problems:
                raise ckpt.CheckpointError(
                    f"no usable checkpoint in {self.save_path} to resume from:\n  "
                    + "\n  ".join(reason for _, reason in problems)
                    + "\nNothing was deleted. Move these files away to start over, or restore one."
                )
            return None, None
        latest = self.path("latest.pth")
        if self.is_main and any(bad == latest for bad, _ in problems):
            aside = free_name(latest + ".corrupt")
            os.replace(latest, aside)
            logger.warning(f"renamed {latest} to {aside}; resuming from {path} instead")
        elif self.is_main and path != latest:
            logger.warning(f"{latest} is missing (a save was interrupted); resuming from {path}")
        return path, state if state is not None else ckpt.load_training_state(path)

    def write_config(self, cfg: dict, iteration: int) -> None:
        """config.yaml; a resumed run whose config differs keeps the old one as config.<iteration>.yaml
        (the config that ran up to that iteration), so the record of what ran is never lost."""
        if not self.is_main or self.save_path is None:
            return
        path = self.path("config.yaml")
        text = yaml.safe_dump(cfg, sort_keys=False)
        try:
            if os.path.isfile(path):
                with open(path) as f:
                    old = f.read()
                if yaml.safe_load(old) != yaml.safe_load(text):
                    kept = free_name(self.path(f"config.{iteration}.yaml"))
                    write_atomic(kept, old)
                    logger.warning(
                        f"the config changed: the one used before iteration {iteration} is kept as {kept}"
                    )
            write_atomic(path, text)
        except OSError as err:
            raise ConfigError(f"cannot write {path}: {err.strerror or err}") from err

    def append_evals(self, rows: list[dict], iteration: int) -> None:
        """One JSON line per evaluated network; earlier lines of this iteration (a resumed run evaluates
        it again) are replaced, so the file reads like an uninterrupted run's."""
        if not self.is_main or self.save_path is None:
            return
        path = self.path("evals.jsonl")
        lines = []
        if os.path.isfile(path):
            with open(path) as f:
                lines = [line for line in f if line.strip() and json.loads(line)["iteration"] < iteration]
        lines += [json.dumps(row) + "\n" for row in rows]
        try:
            write_atomic(path, "".join(lines))
        except OSError as err:
            logger.error(f"could not write {path}: {err.strerror or err}")


@dataclass
class TrainingState:
    """What latest.pth holds, assembled from the parts of a training run and put back into them on resume:
    every network, the optimizer and GradScaler, the method's state (shared, and every rank's own), the
    counters, the best score, the seconds and every rank's random states."""

    cfg: dict
    dist: DistInfo
    method: Method
    networks: Networks
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    progress: Progress
    guard: NonFiniteGuard
    evaluator: Evaluator
    clock: RunClock
    batchnorm: RankBatchNorm
    saver: Saver

    def state_dict(self, with_batchnorm_per_rank: bool = False) -> dict:
        """The whole training state; a collective (every rank's RNG state is gathered).
        `with_batchnorm_per_rank`: each rank's own BatchNorm statistics too (RankBatchNorm)."""
        per_rank = self.batchnorm.per_rank_state_dict() if with_batchnorm_per_rank else {}
        # CPU ranks keep their own BN running statistics; the checkpoint holds one copy of each network, so
        # the ranks agree on it first (otherwise a resumed run restarts every rank from rank 0's statistics).
        self.batchnorm.average()
        deploy = self.networks.deploy[0]
        own = to_device(self.method.rank_state_dict(), "cpu", non_blocking=False)
        return {
            "networks": {name: net.state_dict() for name, net in self.networks.all.items()},
            "model": self.method.deploy_state(deploy, self.networks.all[deploy]),  # for eval.py
            "method_name": type(self.method).__name__,
            "code_version": ckpt.code_version(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "method_per_rank": all_gather_objects(own),
            "iteration": self.progress.iteration,
            **self.evaluator.state_dict(),
            "nonfinite_steps": self.guard.steps,
            "scaler_skips": self.progress.scaler_skips,
            **self.clock.state_dict(),
            "world_size": self.dist.world_size,
            "rng": all_gather_objects(rng_state()),
            "cfg": self.cfg,
            **per_rank,
        }

    def load_state_dict(self, state: dict) -> None:
        networks = state.get("networks") or {"model": state["model"]}  # checkpoints before named networks
        ours = sorted(self.networks.all)
        if sorted(networks) != ours:
            raise ckpt.CheckpointError(
                f"the checkpoint holds networks {sorted(networks)}; this method has {ours}"
            )
        for name, net in self.networks.all.items():
            ckpt.load_model_weights(net, networks[name], f"network '{name}'")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        same_ranks = state["world_size"] == self.dist.world_size
        per_rank = state.get("method_per_rank")  # checkpoints from before it existed: none
        self.method.load_rank_state_dict(per_rank[self.dist.rank] if same_ranks and per_rank else {})
        if same_ranks:
            set_rng_state(state["rng"][self.dist.rank])
            self.batchnorm.load_per_rank_state_dict(state, self.dist.rank)
        iteration = self.progress.iteration = state["iteration"]
        self.evaluator.load_state_dict(state, iteration)
        self.guard.steps = state.get("nonfinite_steps", 0)
        self.progress.scaler_skips = state.get("scaler_skips", 0)
        self.clock.load_state_dict(state, iteration)

    def save_latest(self, state: dict | None = None) -> None:
        """latest.pth; not during a run of skipped steps, so that latest.pth keeps the state from before the
        first of them (the final iteration is always saved: its weights are those of the last good step)."""
        iteration = self.progress.iteration
        if self.guard.streak and iteration < self.progress.total_iters:
            if self.dist.is_main:
                logger.warning(
                    f"iteration {iteration}: latest.pth not updated while steps are non-finite "
                    f"({self.guard.streak} in a row)"
                )
            return
        self.saver.save_latest(state if state is not None else self.state_dict(), iteration)

    def resume(self) -> bool:
        """Continue from save_path/latest.pth (or previous.pth when latest.pth is unusable)."""
        path, state = self.saver.find_resumable()
        if path is None:
            return False
        ours = type(self.method).__name__
        theirs = state.get("method_name", ours)  # checkpoints from before it was recorded: not known
        if theirs != ours:
            raise ckpt.CheckpointError(
                f"{path} was written by {theirs} (code {state.get('code_version', 'unknown')}); this is "
                f"{ours}. Resume it with {theirs}'s script, or give {ours} another --save-path"
            )
        try:
            self.load_state_dict(state)
        except ckpt.CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit this run: {type(err).__name__}: {err}"
            ) from err
        iteration, total_iters = self.progress.iteration, self.progress.total_iters
        self.saver.saved_iteration = iteration
        if self.dist.is_main:
            self._warn_about_differences(state, path)
        if iteration > total_iters:
            raise ConfigError(
                f"{path} holds iteration {iteration}, past the end of this run ({self._length()}). "
                f"Nothing was changed: set max_iters to at least {iteration} to continue it, evaluate "
                "it with eval.py, or give another --save-path to train this run from the start"
            )
        logger.info(f"resumed from {path} at iteration {iteration}/{total_iters}")
        return True

    def _length(self) -> str:
        """The run's length in iterations and the config keys that set it."""
        total_iters = self.progress.total_iters
        if self.cfg["max_iters"]:
            return f"max_iters={total_iters}"
        return (
            f"epochs={self.cfg['epochs']} x {self.progress.iters_per_epoch} iterations per epoch = "
            f"{total_iters} iterations"
        )

    def _warn_about_differences(self, state: dict, path: str) -> None:
        version, ours = state.get("code_version", "unknown"), ckpt.code_version()
        if version != ours:
            logger.warning(f"{path} was written by code {version}; this is code {ours}")
        if state["world_size"] != self.dist.world_size:
            logger.warning(
                f"{path} was written by {state['world_size']} process(es), this run has "
                f"{self.dist.world_size}: random states are not restored and the data order changes, "
                "so the run continues but is not identical to an uninterrupted one"
            )
        changes = config_changes(state["cfg"], self.cfg) if isinstance(state.get("cfg"), dict) else []
        if changes:
            logger.warning(
                f"the config differs from the one {path} was trained with: " + ", ".join(map(str, changes))
            )


def prepare_save_path(save_path: str) -> None:
    """Create the output folder and prove it is writable before any training happens."""
    try:
        os.makedirs(save_path, exist_ok=True)
        probe = os.path.join(save_path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"cannot write to save path {save_path}: {err.strerror or err}") from err


def free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ...: the first that does not exist (bad files are never overwritten)."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def lock_save_path(save_path: str):
    """An exclusive lock on save_path/.lock (util.lock), held as long as the returned file is open.

    Only this process holds it, not its loader workers, and the kernel drops it when the process ends, however
    it ends, so a killed run never blocks its restart. A second run on the same save path stops at once with a
    ConfigError naming the holder's host and PID. Where the filesystem has no locks (some NFS or Lustre
    mounts) this warns and returns None.
    """
    path = os.path.join(save_path, ".lock")
    try:
        return lock(path)
    except LockHeld as held:
        raise ConfigError(
            f"save path {save_path} is in use by another run ({held.holder}); wait for it to end, stop it, "
            "or choose another --save-path"
        ) from None
    except OSError as err:
        logger.warning(
            f"cannot lock {path} ({err.strerror or err}): two runs on this save path are not prevented"
        )
        return None
