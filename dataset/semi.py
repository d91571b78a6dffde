"""Labeled, unlabeled and validation datasets for semi-supervised segmentation.

A split file lists one sample per line, paths relative to the dataset root, in the
format of UniMatch's published splits::

    JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png

The mask column is optional for unlabeled images (``mode='train_u'``). Everything
that can be checked without decoding images (files exist, paths stay inside the
root) is checked in ``__init__``, so a broken split fails before training starts;
decoding problems and bad mask values are reported, naming the file, when the
sample is read.
"""

import logging
import math
import os

import numpy as np
import torch
from PIL import Image

from dataset import transforms as T

logger = logging.getLogger("semiseg")

MODES = ("train_l", "train_u", "val")
CUTMIX_BOXES = ("unimatch", "three_boxes")
TRUTH = 6  # where an unlabeled sample carries its mask (truth=True); what wraps it appends after


class DataError(ValueError):
    """A split file or a data file that cannot be used as it is; the message names the file."""


# Masks must hold class indices, one channel. 'I;16*' and 'I' are 16/32-bit PNGs.
_MASK_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")

# The smallest side of a training image: the random resize may halve it, and 1 pixel would become 0.
MIN_TRAIN_SIDE = 2


class SemiDataset(torch.utils.data.Dataset):
    """One split of a segmentation dataset, in one of three modes.

    - ``val``: ``(image (3, H, W) float, mask (H, W) long, id)``; full image, no augmentation.
      ``id`` is the image path as written in the split file.
    - ``train_l``: ``(image (3, S, S), mask (S, S) long)``; resize, crop, flip.
      The padding of the crop is 255 in the mask.
    - ``train_u``: ``(weak, strong1, strong2, ignore_mask, cutmix_box1, cutmix_box2)``;
      ``weak`` is the resized/cropped/flipped image, ``strong1``/``strong2`` are two
      independent colour augmentations of it, ``ignore_mask`` (S, S) long is 255 on the
      crop padding and 0 elsewhere, the boxes are (S, S) long 0/1 CutMix regions (UniMatch's
      single box on half the images, or with ``cutmix='three_boxes'`` three boxes on every image).
      With ``truth=True`` a seventh item (at ``TRUTH``) follows: the image's own mask, cropped
      like it ((S, S) long, 255 on void and padding), for measuring pseudo-labels only.

    ``nsample`` (``train_l`` only) repeats the labeled list up to ``nsample`` items so
    that one epoch over the labeled set is as long as one over the unlabeled set; a
    list already longer than ``nsample`` is kept whole.
    """

    def __init__(
        self,
        root,
        mode,
        id_path,
        nclass,
        crop_size=None,
        nsample=None,
        ignore_index=255,
        allow_outside_root=False,
        truth=False,
        cutmix="unimatch",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if cutmix not in CUTMIX_BOXES:
            raise ValueError(f"cutmix must be one of {CUTMIX_BOXES}, got {cutmix!r}")
        if mode != "val" and crop_size is None:
            raise ValueError(f"mode {mode!r} needs a crop_size")
        self.root = root
        self.mode = mode
        self.nclass = nclass
        self.crop_size = crop_size
        self.ignore_index = ignore_index
        self.cutmix = cutmix

        # Unlabeled masks are read only to measure pseudo-labels (truth=True, when every line has one),
        # so their column is optional.
        entries = read_split(id_path, need_mask=mode != "train_u")
        self.truth = mode == "train_u" and truth and unlabeled_masks_found(entries, id_path, root)
        if mode == "train_u" and not self.truth:
            entries = [(lineno, img, None) for lineno, img, _ in entries]
        check_paths(entries, id_path, root, allow_outside_root)
        self.samples = [(img, mask) for _, img, mask in entries]

        # Repeat the (small) labeled list so that an epoch over it is as long as one over the
        # unlabeled list. Unlike UniMatch we never shorten it: a labeled image is never dropped.
        if mode == "train_l" and nsample is not None and nsample > len(self.samples):
            self.samples *= math.ceil(nsample / len(self.samples))
            self.samples = self.samples[:nsample]

        self.strong = T.strong_color_transform()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        img_path, mask_path = self.samples[index]
        img = load_image(os.path.join(self.root, img_path))
        if self.mode != "val":
            check_trainable(img.size, os.path.join(self.root, img_path))

        if self.mode == "train_u":
            # A zero "label" follows the image through the geometric augmentations so
            # that the crop padding (filled with 255) can be told apart afterwards; the image's own
            # mask, when measured against, follows as a second channel.
            mask = np.zeros((img.height, img.width), dtype=np.uint8)
            if self.truth:
                full_mask_path = os.path.join(self.root, mask_path)
                truth = load_mask(full_mask_path, self.nclass, self.ignore_index)
                check_same_size(
                    img.size, truth.shape[::-1], os.path.join(self.root, img_path), full_mask_path
                )
                mask = np.stack((mask, truth.astype(np.uint8)))
        else:
            full_mask_path = os.path.join(self.root, mask_path)
            mask = load_mask(full_mask_path, self.nclass, self.ignore_index)
            check_same_size(img.size, mask.shape[::-1], os.path.join(self.root, img_path), full_mask_path)
        mask = T.as_mask(mask)

        if self.mode == "val":
            img, mask = T.normalize(img, mask)
            return img, mask, img_path

        img, mask = T.random_resize(img, mask, (0.5, 2.0))
        img, mask = T.random_crop(img, mask, self.crop_size, mask_fill=255)
        img, mask = T.random_hflip(img, mask, p=0.5)

        if self.mode == "train_l":
            return T.normalize(img, mask)

        mask = torch.as_tensor(mask).as_subclass(torch.Tensor).long()
        ignore_mask, truth = (mask[0], mask[1]) if self.truth else (mask, None)
        strong1 = self.strong(img)
        strong2 = self.strong(img)
        if self.cutmix == "unimatch":
            box1 = T.cutmix_box(self.crop_size, p=0.5)
            box2 = T.cutmix_box(self.crop_size, p=0.5)
        else:
            box1 = T.three_boxes(self.crop_size)
            box2 = T.three_boxes(self.crop_size)
        sample = (T.normalize(img), T.normalize(strong1), T.normalize(strong2), ignore_mask, box1, box2)
        return (*sample, truth) if self.truth else sample


def read_split(id_path, need_mask):
    """Parse a split file into ``[(line number, image path, mask path or None), ...]``."""
    if not os.path.isfile(id_path):
        raise FileNotFoundError(f"split file not found: {id_path}")
    entries = []
    with open(id_path) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) > 2:
                raise DataError(
                    f"{id_path}:{lineno}: expected '<image> [<mask>]', got {len(fields)} columns "
                    f"(paths with spaces are not supported): {line.strip()!r}"
                )
            if need_mask and len(fields) < 2:
                raise DataError(f"{id_path}:{lineno}: missing mask column for image {fields[0]!r}")
            entries.append((lineno, fields[0], fields[1] if len(fields) == 2 else None))
    if not entries:
        raise DataError(f"split file is empty: {id_path}")
    return entries


def unlabeled_masks_found(entries, id_path, root):
    """Whether every line of an unlabeled split names a mask that exists (then pseudo-labels can be
    measured against them); a list with some missing is trained on all the same, with a warning."""
    masks = [mask for _, _, mask in entries]
    if any(mask is None for mask in masks):
        return False
    missing = [mask for mask in masks if not os.path.isfile(os.path.join(root, mask))]
    if missing:
        logger.warning(
            f"{id_path}: {len(missing)} of its {len(masks)} masks do not exist (e.g. {missing[0]}); the "
            "pseudo-labels are not measured against them (unlabeled images need no mask)"
        )
    return not missing


def check_paths(entries, id_path, root, allow_outside_root=False):
    """Fail fast on paths that leave the root or point at missing files."""
    missing = []
    for lineno, *paths in entries:
        for path in paths:
            if path is None:
                continue
            if not allow_outside_root and escapes_root(path):
                raise DataError(
                    f"{id_path}:{lineno}: path {path!r} is absolute or leaves the dataset root "
                    f"(pass allow_outside_root=True if this is intended)"
                )
            if not os.path.isfile(os.path.join(root, path)):
                missing.append(f"{id_path}:{lineno}: {os.path.join(root, path)}")
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(f"{len(missing)} file(s) listed in {id_path} do not exist:\n  {shown}{more}")


def escapes_root(path):
    if os.path.isabs(path):
        return True
    norm = os.path.normpath(path)
    return norm == os.pardir or norm.startswith(os.pardir + os.sep)


def load_image(path):
    """Open an image as RGB, decoding it fully so that broken files fail here, by name.

    Grayscale (L), palette (P), RGBA and CMYK images are converted with PIL's
    ``convert('RGB')``: grey is replicated to three channels, palettes are expanded
    and the alpha channel is dropped (not composited). 16-bit grayscale images (modes
    I;16 and I, which PIL uses for 16-bit PNGs) are scaled from 0..65535 to 0..255
    first; PIL's own conversion would clip them to 255.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "I" or img.mode.startswith("I;16"):
                gray = np.asarray(img, dtype=np.float64) / 257.0
                return Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
            # convert() also copies, so the result outlives the closed file.
            return img.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def load_mask(path, nclass, ignore_index=255):
    """Read a single-channel mask of class indices and check its values."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mode = mask.mode
            array = np.array(mask) if mode in _MASK_MODES else None
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from e
    check_mask_mode(mode, path)

    bad = invalid_values(array, nclass, ignore_index)
    if len(bad):
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(
            f"mask {path} has values [{shown}] outside [0, {nclass}) "
            f"that are not the ignore index {ignore_index}"
        )
    # Small integers keep the geometric augmentations cheap; int64 only if needed.
    return array.astype(np.uint8 if array.max(initial=0) <= 255 else np.int64, copy=False)


def invalid_values(array, nclass, ignore_index=255):
    """The distinct values of ``array`` that are neither a class index nor ``ignore_index``."""
    if array.dtype in (np.uint8, np.uint16):
        values = np.flatnonzero(np.bincount(array.ravel()))
    else:
        values = np.unique(array)
    return values[((values < 0) | (values >= nclass)) & (values != ignore_index)]


def check_mask_mode(mode, path):
    if mode not in _MASK_MODES:
        raise DataError(f"mask must be single-channel class indices, got {mode}: {path}")


def check_same_size(img_size, mask_size, img_path, mask_path):
    """Sizes as (width, height), as PIL gives them."""
    if tuple(img_size) != tuple(mask_size):
        raise DataError(
            f"image and mask sizes differ: {img_path} is {img_size[0]}x{img_size[1]}, "
            f"{mask_path} is {mask_size[0]}x{mask_size[1]} (width x height)"
        )


def check_trainable(img_size, path):
    if min(img_size) < MIN_TRAIN_SIDE:
        raise DataError(
            f"image {path} is {img_size[0]}x{img_size[1]}, too small to train on (less than {MIN_TRAIN_SIDE} "
            "pixels a side: the random resize would leave nothing)"
        )
