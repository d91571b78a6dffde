"""Before training, read what training will read: a bad file stops the run at once, with a list of them,
instead of at the batch or the evaluation that meets it.

`check_data: headers` (the default) opens every labeled and validation image and mask and a sample of the
unlabeled images: each must be an image PIL can identify, masks single-channel, image and mask of one size,
training images at least MIN_TRAIN_SIDE pixels a side. Headers only, in parallel threads: seconds for
Pascal VOC's 10k images. `full` also decodes every file and checks the mask values (a truncated JPEG shows
only then); `off` skips the check (the dataset still names a bad file when it meets it).
"""

import os
import random
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

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


def check_data(cfg: dict, need_unlabeled: bool) -> None:
    """Raise a DataError listing up to SHOWN unusable files of the splits `cfg` names (see above)."""
    if cfg["check_data"] == "off":
        return
    root, full = cfg["data_root"], cfg["check_data"] == "full"
    splits = [(cfg["labeled_id_path"], "train"), (cfg["val_id_path"], "val")]
    if need_unlabeled:
        splits.append((cfg["unlabeled_id_path"], "unlabeled"))
    samples = {}  # (image, mask or None) -> trained on; a file listed twice is read once
    for id_path, kind in splits:
        entries = read_split(id_path, need_mask=kind != "unlabeled")
        if kind == "unlabeled":
            entries = [(lineno, image, None) for lineno, image, _ in entries]
            entries = random.Random(0).sample(entries, min(len(entries), UNLABELED_SAMPLE))
        check_paths(entries, id_path, root, cfg["allow_outside_data_root"])
        for _, image, mask in entries:
            samples[image, mask] = samples.get((image, mask), False) or kind != "val"

    def check(item):
        (image, mask), trained = item
        return check_sample(root, image, mask, cfg["nclass"], full, trained)

    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = [p for p in pool.map(check, samples.items()) if p is not None]
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(
            f"{len(problems)} of {len(samples)} samples cannot be used (checked before training, "
            f"check_data: {cfg['check_data']}):\n  " + "\n  ".join(problems[:SHOWN]) + more
        )


def check_sample(root, image, mask, nclass, full, trained) -> str | None:
    """What is wrong with one image (and its mask), or None."""
    image_path = os.path.join(root, image)
    try:
        size = load_image(image_path).size if full else header(image_path, "image")[1]
        if trained:
            check_trainable(size, image_path)
        if mask is not None:
            mask_path = os.path.join(root, mask)
            if full:
                mask_size = load_mask(mask_path, nclass).shape[::-1]
            else:
                mode, mask_size = header(mask_path, "mask")
                check_mask_mode(mode, mask_path)
            check_same_size(size, mask_size, image_path, mask_path)
    except DataError as err:
        return str(err)
    return None


def header(path: str, what: str) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except Exception as err:
        raise DataError(f"cannot read {what} {path}: {err}") from err
