"""Before training, read what training will read: a bad file stops the run at once, with a list of them,
instead of at the batch or the evaluation that meets it.

`check_data: headers` (the default) opens every labeled and validation image and mask and a sample of the
unlabeled images: each must be an image PIL can identify, masks single-channel, image and mask of one size,
training images at least MIN_TRAIN_SIDE pixels a side. Headers only, in parallel threads: seconds for
Pascal VOC's 10k images. Validation masks are also decoded and their values checked (class ids below nclass,
or 255): training reads every labeled mask within its first epoch, but nothing reads a validation mask before
the first evaluation, which would then stop the run with that interval lost. `full` also decodes every other
file and checks the labeled mask values (a truncated JPEG shows only then); `off` skips the check (the dataset
still names a bad file when it meets it).

What trains but looks wrong comes back as warnings: labeled and unlabeled lists that share images, and an
nclass larger than the classes the decoded masks or the dataset's built-in class names show.
"""

import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dataset.classes import CLASS_NAMES, CLASSES_FILE
from dataset.semi import (
    DataError,
    check_mask_mode,
    check_paths,
    check_same_size,
    check_trainable,
    load_image,
    load_mask,
    read_split,
)

UNLABELED_SAMPLE = 1000  # unlabeled images checked (all of them when there are fewer)
SHOWN = 20  # problems listed in the error
IGNORE_INDEX = 255


@dataclass
class Use:
    """How training uses one (image, mask) pair of the splits."""

    trained: bool = False  # in the labeled or the unlabeled split
    evaluated: bool = False  # in the validation split


@dataclass(frozen=True)
class SampleCheck:
    problem: str | None = None  # what is wrong with the sample, naming the file
    class_ids: frozenset = frozenset()  # the class ids its mask holds, when its values were read
    mask_read: bool = False  # whether its mask values were read


def check_data(cfg: dict, need_unlabeled: bool) -> list[str]:
    """Raise a DataError listing up to SHOWN unusable files of the splits `cfg` names (see above); return
    warnings about what trains but looks wrong."""
    if cfg["check_data"] == "off":
        return []
    root, full = cfg["data_root"], cfg["check_data"] == "full"
    splits = [(cfg["labeled_id_path"], "train"), (cfg["val_id_path"], "val")]
    if need_unlabeled:
        splits.append((cfg["unlabeled_id_path"], "unlabeled"))
    samples: dict[tuple, Use] = {}  # (image, mask or None) -> its use; a file listed twice is read once
    images = {}  # split kind -> every image path it lists
    for id_path, kind in splits:
        entries = read_split(id_path, need_mask=kind != "unlabeled")
        images[kind] = [image for _, image, _ in entries]
        if kind == "unlabeled":
            entries = [(lineno, image, None) for lineno, image, _ in entries]
            entries = random.Random(0).sample(entries, min(len(entries), UNLABELED_SAMPLE))
        check_paths(entries, id_path, root, cfg["allow_outside_data_root"])
        for _, image, mask in entries:
            use = samples.setdefault((image, mask), Use())
            use.trained |= kind != "val"
            use.evaluated |= kind == "val"

    def check(item):
        (image, mask), use = item
        return check_sample(root, image, mask, cfg["nclass"], full, use)

    with ThreadPoolExecutor(max_workers=16) as pool:
        checks = list(pool.map(check, samples.items()))
    problems = [c.problem for c in checks if c.problem is not None]
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(
            f"{len(problems)} of {len(samples)} samples cannot be used (checked before training, "
            f"check_data: {cfg['check_data']}):\n  " + "\n  ".join(problems[:SHOWN]) + more
        )
    warnings = []
    if need_unlabeled:
        warnings += overlap_warnings(images["train"], images["unlabeled"], cfg)
    masks_read = sum(c.mask_read for c in checks)
    seen = frozenset().union(*(c.class_ids for c in checks))
    warnings += nclass_warnings(cfg, seen, masks_read, full)
    return warnings


def check_sample(root, image, mask, nclass, full, use: Use) -> SampleCheck:
    """What is wrong with one image (and its mask), and the class ids of the mask when its values are read."""
    image_path = os.path.join(root, image)
    read_values = mask is not None and (full or use.evaluated)
    class_ids = frozenset()
    try:
        size = load_image(image_path).size if full else header(image_path, "image")[1]
        if use.trained:
            check_trainable(size, image_path)
        if mask is not None:
            mask_path = os.path.join(root, mask)
            if read_values:
                values = load_mask(mask_path, nclass, IGNORE_INDEX)
                mask_size = values.shape[::-1]
                class_ids = present_classes(values)
            else:
                mode, mask_size = header(mask_path, "mask")
                check_mask_mode(mode, mask_path)
            check_same_size(size, mask_size, image_path, mask_path)
    except DataError as err:
        return SampleCheck(problem=str(err))
    return SampleCheck(class_ids=class_ids, mask_read=read_values)


def present_classes(mask: np.ndarray) -> frozenset:
    """The class ids a mask holds (the ignore index left out)."""
    counts = np.bincount(mask.ravel()) if mask.dtype == np.uint8 else None
    values = np.flatnonzero(counts) if counts is not None else np.unique(mask)
    return frozenset(int(v) for v in values if v != IGNORE_INDEX)


def overlap_warnings(labeled: list[str], unlabeled: list[str], cfg: dict) -> list[str]:
    """A warning when images of the unlabeled list are in the labeled list too (the published partitions
    keep the two apart; a list given twice by mistake trains the labeled images as unlabeled ones too)."""
    labeled_images = {os.path.normpath(image) for image in labeled}
    shared = [image for image in unlabeled if os.path.normpath(image) in labeled_images]
    if not shared:
        return []
    return [
        f"{len(shared)} of the {len(unlabeled)} images of unlabeled_id_path {cfg['unlabeled_id_path']} are "
        f"also in labeled_id_path {cfg['labeled_id_path']} (e.g. {shared[0]}): they train as labeled and as "
        "unlabeled images. Are these the lists you meant?"
    ]


def nclass_warnings(cfg: dict, seen: frozenset, masks_read: int, full: bool) -> list[str]:
    """Warnings when nclass is larger than what the data shows: the class ids of the masks read, and the
    built-in class names of a known dataset (a classes file of another length is an error elsewhere)."""
    nclass, warnings = cfg["nclass"], []
    highest = max(seen, default=-1)
    if masks_read and highest < nclass - 1:
        which = "labeled and validation" if full else "validation"
        if highest == nclass - 2:
            missing = f"class {nclass - 1} never appears"
        else:
            missing = f"classes {highest + 1} to {nclass - 1} never appear"
        warnings.append(
            f"nclass is {nclass}, but the {masks_read} {which} masks read hold class ids up to {highest} "
            f"only: {missing} (is nclass right?)"
        )
    names = CLASS_NAMES.get(cfg["dataset"])
    classes_file = cfg.get("classes") or os.path.join(cfg["data_root"], CLASSES_FILE)
    if names is not None and len(names) < nclass and not os.path.isfile(classes_file):
        warnings.append(
            f"nclass is {nclass}, but dataset '{cfg['dataset']}' has {len(names)} classes "
            f"({', '.join(names)}): the extra outputs never learn a class (is nclass right?)"
        )
    return warnings


def header(path: str, what: str) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err
