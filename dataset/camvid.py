"""CamVid, converted from the SegNet release into the project's layout.

The SegNet release of CamVid (the ``CamVid/`` folder of the SegNet tutorial) holds three splits, each a
folder of images and a folder of annotations with the same file names::

    CamVid/train/<name>.png        367 road scenes, 480x360 RGB
    CamVid/trainannot/<name>.png   one channel: class ids 0..10, 11 = void
    CamVid/val/, CamVid/valannot/  101
    CamVid/test/, CamVid/testannot/  233

``convert_camvid`` writes what the split files and loaders read::

    <data_root>/JPEGImages/<name>.png          the image, resized bilinearly
    <data_root>/SegmentationClass/<name>.png   class ids 0..10 and 255 = void, resized to the nearest pixel
    <data_root>/classes.txt                    the 11 class names in id order with their SegNet colours
    <data_root>/train.txt, val.txt, test.txt   '<image> <mask>' lines of each split, by name

Every input is read and checked before anything is written, so bad input stops the conversion with the
file named and nothing changed. A file already in ``data_root`` with the same content is left as it is
(converting the same release again changes nothing); one with other content stops the conversion before
anything is written, unless ``overwrite``. Each file is written atomically, and the lists last, so a list
only ever names files that are there.

Usage (``tools/make_splits.py camvid`` calls it)::

    python tools/make_splits.py camvid --source CamVid --data-root data/camvid --scale 0.25   # 120x90
"""

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dataset.classes import CAMVID_CLASSES, CAMVID_COLORS
from util.files import holds_text, write_atomic

SPLITS = ("train", "val", "test")
SOURCE_VOID = 11  # the SegNet release's void id
IGNORE_INDEX = 255  # the project's ignore label
IMAGE_FOLDER = "JPEGImages"
MASK_FOLDER = "SegmentationClass"


@dataclass(frozen=True)
class CamVidSample:
    """One image of the SegNet release and its annotation (paths in the release's folder)."""

    split: str
    name: str  # the file name without .png, the same in every folder
    image: str
    annotation: str

    @property
    def line(self) -> str:
        """Its line in a split file, relative to the converted data root."""
        return f"{IMAGE_FOLDER}/{self.name}.png {MASK_FOLDER}/{self.name}.png"

    def outputs(self, data_root: str) -> tuple[str, str]:
        """The converted image and mask it becomes."""
        return (
            os.path.join(data_root, IMAGE_FOLDER, f"{self.name}.png"),
            os.path.join(data_root, MASK_FOLDER, f"{self.name}.png"),
        )


@dataclass(frozen=True)
class Conversion:
    """What ``convert_camvid`` did."""

    counts: tuple[tuple[str, int], ...]  # (split, images) in SPLITS order
    sizes: tuple[tuple[int, int], ...]  # the distinct output sizes (width, height)
    converted: int  # samples written
    unchanged: int  # samples whose image and mask were already there with the same content


def png_stems(folder: str) -> set[str]:
    return {name[: -len(".png")] for name in os.listdir(folder) if name.endswith(".png")}


def find_samples(source: str) -> list[CamVidSample]:
    """Every image of the release with its annotation, split by split, by name; errors name the file."""
    samples, split_of = [], {}
    for split in SPLITS:
        image_dir, annotation_dir = os.path.join(source, split), os.path.join(source, split + "annot")
        for folder in (image_dir, annotation_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"CamVid folder not found: {folder} (the SegNet release holds "
                    + ", ".join(f"{s}/ and {s}annot/" for s in SPLITS)
                    + ")"
                )
        images, annotations = png_stems(image_dir), png_stems(annotation_dir)
        if not images:
            raise FileNotFoundError(f"no .png images in {image_dir}")
        missing = sorted(images - annotations)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) in {image_dir} have no annotation, e.g. "
                f"{os.path.join(image_dir, missing[0] + '.png')} (expected "
                f"{os.path.join(annotation_dir, missing[0] + '.png')})"
            )
        orphans = sorted(annotations - images)
        if orphans:
            raise FileNotFoundError(
                f"{len(orphans)} annotation(s) in {annotation_dir} have no image, e.g. "
                f"{os.path.join(annotation_dir, orphans[0] + '.png')}"
            )
        for name in sorted(images):
            # Split files separate image and mask by a space; every split lands in one JPEGImages/.
            if " " in name:
                raise ValueError(f"split files cannot hold names with spaces: {image_dir}/{name}.png")
            if name in split_of:
                raise ValueError(f"{name}.png is in both {split_of[name]}/ and {split}/ of {source}")
            split_of[name] = split
            samples.append(
                CamVidSample(
                    split,
                    name,
                    os.path.join(image_dir, f"{name}.png"),
                    os.path.join(annotation_dir, f"{name}.png"),
                )
            )
    return samples


def open_picture(path: str) -> Image.Image:
    """A fully decoded PIL image; a file that is not one is a ValueError naming it."""
    try:
        picture = Image.open(path)
        picture.load()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    return picture


def read_sample(sample: CamVidSample) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and the annotation's class ids (H, W), checked: one channel, the image's size, 0..11."""
    image = open_picture(sample.image).convert("RGB")
    annotation = open_picture(sample.annotation)
    ids = np.asarray(annotation)
    if ids.ndim != 2:
        raise ValueError(
            f"{sample.annotation}: an annotation has one channel of class ids, this one is {annotation.mode}"
        )
    if annotation.size != image.size:
        raise ValueError(
            f"{sample.annotation} is {annotation.width}x{annotation.height} but its image {sample.image} is "
            f"{image.width}x{image.height}"
        )
    bad = np.unique(ids[(ids < 0) | (ids > SOURCE_VOID)])
    if bad.size:
        raise ValueError(
            f"{sample.annotation} holds class ids {bad[:5].tolist()} outside 0..{SOURCE_VOID} "
            f"(0..{SOURCE_VOID - 1} are classes, {SOURCE_VOID} is void)"
        )
    return image, ids


def output_size(
    size: tuple[int, int], scale: float | None = None, target: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(width, height) of an output: ``target``, else ``size`` times ``scale`` rounded, else ``size``."""
    if target is not None:
        return target
    if scale is not None:
        return tuple(max(1, int(side * scale + 0.5)) for side in size)
    return size


def convert_sample(
    image: Image.Image, ids: np.ndarray, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """The converted image (RGB, bilinear) and mask (one channel, nearest; void 11 -> 255) at ``size``."""
    mask = Image.fromarray(np.where(ids == SOURCE_VOID, IGNORE_INDEX, ids).astype(np.uint8))
    if image.size != size:
        # Nearest keeps every mask pixel one of the annotation's ids; bilinear would blend ids.
        image = image.resize(size, Image.Resampling.BILINEAR)
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return image, mask


def same_picture(path: str, picture: Image.Image) -> bool:
    """Whether the file ``path`` holds the pixels of ``picture`` (however it is encoded)."""
    try:
        found = np.asarray(open_picture(path))
    except ValueError:
        return False
    wanted = np.asarray(picture)
    return found.shape == wanted.shape and bool((found == wanted).all())


def write_png(path: str, picture: Image.Image) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def classes_text() -> str:
    """classes.txt: one line per class id, its name and its colour (dataset/classes.py reads it)."""
    return "".join(
        f"{name} {r} {g} {b}\n" for name, (r, g, b) in zip(CAMVID_CLASSES, CAMVID_COLORS, strict=True)
    )


def list_texts(data_root: str, samples: list[CamVidSample]) -> dict[str, str]:
    """The text files of the converted dataset: path -> content."""
    texts = {os.path.join(data_root, "classes.txt"): classes_text()}
    for split in SPLITS:
        lines = [sample.line for sample in samples if sample.split == split]
        texts[os.path.join(data_root, f"{split}.txt")] = "".join(line + "\n" for line in lines)
    return texts


def convert_camvid(
    source: str,
    data_root: str,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> Conversion:
    """Convert the SegNet release in ``source`` into ``data_root`` (see the module docstring).

    ``scale`` multiplies each image's size (0.25: 480x360 -> 120x90); ``size`` is a (width, height) for every
    image; neither keeps the size. Raises FileNotFoundError / ValueError naming the file for bad input, and
    FileExistsError naming a file of ``data_root`` whose content differs (without ``overwrite``).
    """
    if scale is not None and size is not None:
        raise ValueError("give a scale or a size, not both")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if size is not None and not (size[0] > 0 and size[1] > 0):
        raise ValueError(f"size must be positive, got {size[0]}x{size[1]}")
    samples = find_samples(source)
    texts = list_texts(data_root, samples)

    # First pass: read and check every input; convert the samples that are already in data_root to compare.
    to_write, different, sizes = [], [], set()
    for sample in samples:
        image, ids = read_sample(sample)
        out_size = output_size(image.size, scale, size)
        sizes.add(out_size)
        paths = sample.outputs(data_root)
        if not any(os.path.exists(path) for path in paths):
            to_write.append(sample)
            continue
        complete = True
        for path, picture in zip(paths, convert_sample(image, ids, out_size), strict=True):
            if not os.path.exists(path):
                complete = False
            elif not same_picture(path, picture):
                different.append(path)
                complete = False
        if not complete:
            to_write.append(sample)
    different += [path for path, text in texts.items() if os.path.exists(path) and not holds_text(path, text)]
    if different and not overwrite:
        raise FileExistsError(
            f"{len(different)} file(s) in {data_root} differ from this conversion, e.g. {different[0]}; "
            "nothing was written (pass --overwrite to replace them)"
        )

    # Second pass: write. The lists come last, so that they only ever name files that are there.
    for sample in to_write:
        image, ids = read_sample(sample)
        pictures = convert_sample(image, ids, output_size(image.size, scale, size))
        for path, picture in zip(sample.outputs(data_root), pictures, strict=True):
            write_png(path, picture)
    os.makedirs(data_root, exist_ok=True)
    for path, text in texts.items():
        if not holds_text(path, text):
            write_atomic(path, text)
    counts = tuple((split, sum(sample.split == split for sample in samples)) for split in SPLITS)
    return Conversion(counts, tuple(sorted(sizes)), len(to_write), len(samples) - len(to_write))
