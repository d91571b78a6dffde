"""Where training state goes on disk: latest.pth (+ previous.pth), best.pth, config.yaml, evals.jsonl.

Rank 0 writes; every write is atomic (util.files). A write that fails (disk full, file too large, folder
gone) is logged and retried at the next save, and the run ends with a SaveError if the last one failed.
One run at a time per save path: rank 0 holds a lock on save_path/.lock (lock_save_path).
"""

import json
import logging
import os

import yaml

from util import checkpoint as ckpt
from util.config import ConfigError
from util.dist import broadcast_object
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
