"""Reading weight files safely, and torchvision's ImageNet weights by name.

Every weight file is read with `torch.load(..., weights_only=True)`, so a file that carries pickled code
is refused instead of executed, and a zip-format file (torch's format since 1.6) has the CRC-32 of every
part checked first, which `torch.load` itself does not do. util/checkpoint.py reads training checkpoints
with the same two functions; model/ itself depends on torch and torchvision only.

`pretrained: torchvision` (or `torchvision:IMAGENET1K_V2`, any name of torchvision's ResNet weight enums)
takes the file from torch.hub's cache (`$TORCH_HOME/hub/checkpoints/`, by default
`~/.cache/torch/hub/checkpoints/`), downloading it there on first use.
"""

import logging
import os
import re
import zipfile
from urllib.parse import urlparse

import torch

logger = logging.getLogger("semiseg.model")  # a child of the training log: shown in train.log

TORCHVISION = "torchvision"
# `torchvision` alone: the original ImageNet weights (the 76.4% / 77.4% top-1 ResNet-50 / ResNet-101)
TORCHVISION_DEFAULT_TAG = "IMAGENET1K_V1"
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


class WeightsError(ValueError):
    """A weight file or weight name that cannot be used; the message names it."""


ZIP_MAGIC = b"PK\x03\x04"  # torch's format since 1.6
PICKLE_PROTO = 0x80  # the first byte of a pickle of protocol 2 or later, such as torch's legacy format


def file_problem(path: str) -> str | None:
    """What the bytes of a file to torch.load show to be wrong, or None (torch.load decides).

    A file that is neither a zip archive nor a pickle (random bytes, an image, a text file) is not a torch
    file at all; torch's weights-only unpickler would read its first bytes as unknown instructions. A zip
    archive must have its end record and every part must match its CRC-32.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:1] == bytes([PICKLE_PROTO]):
        return None
    if magic != ZIP_MAGIC:
        return (
            "it is not a torch checkpoint: neither torch's zip format nor a pickle (its first bytes are "
            f"{magic.hex(' ')}); nothing in it was run"
        )
    if not zipfile.is_zipfile(path):
        return (
            "it is truncated or damaged (a zip archive, torch's format, without its end record; "
            f"{os.path.getsize(path)} bytes)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"damaged zip structure ({err})"
    if bad is not None:
        return (
            f"it is corrupted: the data of '{bad}' does not match its recorded CRC-32 "
            "(the file was damaged after it was written)"
        )
    return None


def load_failure_reason(err: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in words (without torch's advice to drop weights_only)."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL \S+", text)
        if found:  # a reference to a function or class: what pickled code is made of
            return (
                f"it holds pickled code or objects other than tensors ({found.group(0)}); refused by "
                "torch.load(weights_only=True), nothing in it was executed"
            )
        found = re.search(r"Unsupported operand \S+", text)
        what = f" ({found.group(0)})" if found else ""
        return (
            f"it is not a checkpoint torch.load(weights_only=True) can read: a pickle with instructions it "
            f"refuses{what}; nothing in it was executed"
        )
    return f"not a readable torch checkpoint ({type(err).__name__}: {text.strip()})"


def load_weights_file(path: str, what: str = "weights"):
    """torch.load on the CPU with weights_only=True, after file_problem's checks; errors name the file."""
    if not os.path.isfile(path):
        raise WeightsError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise WeightsError(f"cannot load {what} from '{path}': the file is empty (0 bytes)")
    problem = file_problem(path)
    if problem is not None:
        raise WeightsError(f"cannot load {what} from '{path}': {problem}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickled code refused by weights_only, not a torch file...
        raise WeightsError(f"cannot load {what} from '{path}': {load_failure_reason(err)}") from err


# ---------------------------------------------------------------------------------------------------
# torchvision's weights by name


def is_torchvision_name(pretrained: str | None) -> bool:
    return pretrained is not None and (pretrained == TORCHVISION or pretrained.startswith(TORCHVISION + ":"))


def torchvision_weights(pretrained: str, backbone: str, deep_stem: bool):
    """The torchvision weight enum member that `pretrained` ('torchvision' or 'torchvision:TAG') names.

    Raises WeightsError when the backbone has no such weights or uses the deep stem (torchvision's
    ResNets have the 7x7 stem).
    """
    from torchvision.models import get_model_weights

    tag = pretrained.partition(":")[2] or TORCHVISION_DEFAULT_TAG
    if backbone not in TORCHVISION_BACKBONES:
        raise WeightsError(
            f"pretrained '{pretrained}': torchvision has no ImageNet weights for backbone '{backbone}' "
            f"(one of {', '.join(TORCHVISION_BACKBONES)})"
        )
    if deep_stem:
        raise WeightsError(
            f"pretrained '{pretrained}': torchvision's ResNets have the 7x7 stem; set deep_stem: false "
            "(the deep-stem weights are UniMatch's resnet50.pth / resnet101.pth files, given by path)"
        )
    enum = get_model_weights(backbone)
    try:
        return enum[tag]
    except KeyError:
        names = ", ".join(member.name for member in enum)
        raise WeightsError(
            f"pretrained '{pretrained}': {enum.__name__} has no '{tag}'; choose one of {names} (or DEFAULT)"
        ) from None


def torchvision_cache_path(weights) -> str:
    """Where torch.hub keeps (or will keep) the file of a torchvision weight enum member."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def torchvision_weights_file(pretrained: str, backbone: str, deep_stem: bool) -> str:
    """The path of the named torchvision weights in torch.hub's cache, downloaded there if missing."""
    weights = torchvision_weights(pretrained, backbone, deep_stem)
    path = torchvision_cache_path(weights)
    if os.path.isfile(path):
        logger.info("pretrained %s: torchvision's %s from %s", pretrained, weights, path)
        return path
    logger.info("pretrained %s: downloading torchvision's %s from %s to %s", pretrained, weights,
                weights.url, path)  # fmt: skip
    # torchvision's file names end in the first hex digits of the file's SHA-256: the download checks them.
    found = re.search(r"-([a-f0-9]*)\.", os.path.basename(path))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(weights.url, path, found.group(1) if found else None, progress=False)
    except Exception as err:  # no network, proxy, hash mismatch, unwritable cache
        raise WeightsError(
            f"pretrained '{pretrained}': cannot download {weights.url} to {path} ({type(err).__name__}: "
            f"{err}). Without internet access, copy that file there (TORCH_HOME sets the cache folder)."
        ) from err
    return path


def pretrained_problem(pretrained: str | None, backbone: str, deep_stem: bool) -> str | None:
    """Why the `pretrained` setting cannot work, checked before training starts; None if it can.

    A path must name a file; a torchvision name must fit the backbone (its file may still be downloaded).
    """
    if pretrained is None:
        return None
    if is_torchvision_name(pretrained):
        try:
            torchvision_weights(pretrained, backbone, deep_stem)
        except WeightsError as err:
            return str(err)
        return None
    if not os.path.isfile(pretrained):
        return f"pretrained '{pretrained}' names a file that does not exist"
    return None
