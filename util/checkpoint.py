"""Checkpoints: atomic writes and guarded loads.

A checkpoint is a dict of tensors and plain Python values, so `torch.load(..., weights_only=True)` reads
it and a file that carries pickled code is refused rather than executed.
"""

import os

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not fit the model."""


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A crash during the write leaves the previous file untouched; the rename itself is atomic.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str) -> dict:
    """Read a checkpoint on the CPU; any failure names the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickled code refused by weights_only, not a torch file...
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def model_state(ckpt: dict) -> dict:
    """The model weights of a training checkpoint ({'model': ...}) or of a bare state dict."""
    state = ckpt.get("model", ckpt)
    # Weights saved from a DistributedDataParallel wrapper carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model_weights(model: torch.nn.Module, state: dict, path: str) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {path} does not fit this model (another backbone, width or nclass?)"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)
