"""Checkpoints: atomic writes that keep the previous file, and guarded loads.

A checkpoint is a dict of tensors and plain Python values, so `torch.load(..., weights_only=True)` reads
it and a file that carries pickled code is refused rather than executed. Every load also checks the
CRC-32 that torch's zip format records for each part, which `torch.load` itself does not: a flipped
bit in the weights is reported instead of loaded.
"""

import functools
import glob
import os
import subprocess

import torch

# The guarded reading of weight files lives with the model (model/ imports nothing from util/).
from model import ARCHITECTURE_DEFAULTS, ARCHITECTURE_KEYS
from model.weights import file_problem, load_failure_reason
from util.config import Change, config_changes
from util.files import write_atomic

# What a training checkpoint (latest.pth / previous.pth) must hold to resume from it.
TRAINING_KEYS = (
    "model",
    "optimizer",
    "scaler",
    "method",
    "iteration",
    "best_miou",
    "best_iteration",
    "world_size",
    "rng",
)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not fit the model."""


class SaveError(OSError):
    """A checkpoint could not be written (disk full, file too large, folder gone or read-only)."""


@functools.cache
def code_version() -> str:
    """The git commit of this code, with '+modified' when tracked files differ from it; 'unknown' outside a
    git checkout. Checkpoints record it, so that a result can be traced to the code that made it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit, status = (
            subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20)
            for args in (
                ["rev-parse", "--short=12", "HEAD"],
                ["status", "--porcelain", "--untracked-files=no"],
            )
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+modified" if status.stdout.strip() else "")


def _save(obj, f) -> None:
    """torch.save, with the OS error of a failed write as the exception (disk full, file too large).

    When a write fails inside torch's zip writer, closing the archive fails too and that RuntimeError
    ("unexpected pos ...") replaces the OSError that says what happened; give the OSError back.
    """
    try:
        torch.save(obj, f)
    except RuntimeError as err:
        cause = err.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror) from err


def save_atomic(obj, path: str, previous: str | None = None) -> None:
    """torch.save `obj` to `path` atomically, keeping the file it replaces as `previous` (util.files)."""
    write_atomic(path, lambda f: _save(obj, f), previous)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that a process killed in the middle of a save left behind."""
    removed = []
    for tmp in sorted(glob.glob(os.path.join(glob.escape(folder), "*.pth.tmp.*"))):
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _check_bytes(path: str) -> None:
    """A torch file at all, and every part of a zip-format checkpoint as its CRC-32 recorded it."""
    problem = file_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}")


def load(path: str) -> dict:
    """Read a checkpoint on the CPU; any failure names the file."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder: name a file in it, e.g. {path}/best.pth")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (0 bytes)")
    _check_bytes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickled code refused by weights_only, not a torch file...
        raise CheckpointError(f"cannot load checkpoint {path}: {load_failure_reason(err)}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def check_training_state(state: dict, path: str) -> None:
    """A checkpoint to resume from must be a full training state, not e.g. a best.pth or a weight file."""
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a training checkpoint: missing {', '.join(missing)}")
    if not isinstance(state["iteration"], int) or state["iteration"] < 0:
        raise CheckpointError(f"checkpoint {path}: 'iteration' is {state['iteration']!r}, not a count")
    if not isinstance(state["model"], dict) or not isinstance(state["optimizer"], dict):
        raise CheckpointError(f"checkpoint {path}: 'model' and 'optimizer' must be state dicts")
    if not isinstance(state["rng"], list) or len(state["rng"]) != state["world_size"]:
        raise CheckpointError(f"checkpoint {path}: 'rng' must hold one state per process")


def load_training_state(path: str) -> dict:
    state = load(path)
    check_training_state(state, path)
    return state


def find_resumable(folder: str, names=("latest.pth", "previous.pth")) -> tuple[str | None, dict | None, list]:
    """The first of `names` in `folder` that loads as a training checkpoint.

    Returns (path, state, problems) where problems lists (path, reason) for every file that exists but
    could not be used. (None, None, []) means there is nothing to resume from; (None, None, problems)
    means there are checkpoints and none of them is usable.
    """
    problems = []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            return path, load_training_state(path), problems
        except CheckpointError as err:
            problems.append((path, str(err)))
    return None, None, problems


def model_state(ckpt: dict) -> dict:
    """The model weights of a training checkpoint ({'model': ...}) or of a bare state dict."""
    state = ckpt.get("model", ckpt)
    # Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Strict load; torch's own report names every missing, unexpected or mis-shaped tensor."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (another backbone, width or nclass?): {err}"
        ) from err


def trained_architecture(cfg: dict, state: dict) -> tuple[dict, list[Change]]:
    """`cfg` with the architecture keys of the config saved in the checkpoint `state` (best.pth and
    latest.pth hold theirs; a bare state dict holds none, and `cfg` is returned as it is), and where `cfg`
    said otherwise (saved -> given). Output stride and dilations change no tensor shape, so a network built
    with other values loads the weights and scores them wrong without a word."""
    saved = state.get("cfg")
    if not isinstance(saved, dict):
        return cfg, []
    saved = {**ARCHITECTURE_DEFAULTS, **saved}  # what build_model took for keys its config lacked
    trained = {key: saved[key] for key in ARCHITECTURE_KEYS if key in saved}
    given = {key: cfg[key] for key in trained if key in cfg}
    return {**cfg, **trained}, config_changes(trained, given)


def architecture_warning(config: str, checkpoint: str, changes: list[Change]) -> str:
    """The warning of eval.py and predict.py when a given config disagrees with the checkpoint's own."""
    return (
        f"warning: {config} disagrees with the config saved in {checkpoint} on the architecture (saved -> "
        f"given): {', '.join(map(str, changes))}; the model is built as saved"
    )
