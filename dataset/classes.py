"""Class names and colour palettes, used for logging per-class IoU and for saving coloured masks.

Pascal, Cityscapes, COCO, CamVid and the demo have theirs built in. For any other dataset, a classes file
gives one line per class index, from 0: the name, optionally followed by an R G B colour (0-255)::

    # data/mine/classes.txt
    background 0 0 0
    crack      255 0 0
    road sign  0 0 255

`dataset_classes(cfg)` reads the file the config's `classes` key names, else `<data_root>/classes.txt`
when it exists, else the built-in names (or class_0, class_1, ...) and palette.
"""

import os
from dataclasses import dataclass

import numpy as np

CLASSES_FILE = "classes.txt"

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# Cityscapes train ids 0..18 (every other label id is mapped to 255 by the dataset).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# 'background' followed by the 80 COCO thing categories in the usual order (category ids 1..90, gaps removed).
COCO_CLASSES = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# CamVid's 11 classes in the SegNet release's id order (its void id, 11, is 255 after conversion:
# dataset/camvid.py, which writes these names and CAMVID_COLORS into classes.txt).
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
    "bicyclist",
)  # fmt: skip

# The synthetic demo dataset (dataset/demo.py draws one shape per class index).
DEMO_CLASSES = ("background", "ellipse", "rectangle", "triangle", "cross", "ring")

CLASS_NAMES = {
    "pascal": PASCAL_CLASSES,
    "cityscapes": CITYSCAPES_CLASSES,
    "coco": COCO_CLASSES,
    "camvid": CAMVID_CLASSES,
    "demo": DEMO_CLASSES,
}

# Official Cityscapes colours of the 19 train ids, in train-id order.
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# The usual colours of the SegNet CamVid classes, in id order.
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip

# Datasets with colours of their own; every other dataset takes the VOC colour map.
DATASET_COLORS = {"cityscapes": CITYSCAPES_COLORS, "camvid": CAMVID_COLORS}


def class_names(dataset, nclass):
    """The dataset's class names if it is known and has `nclass` classes, else ('class_0', 'class_1', ...)."""
    names = CLASS_NAMES.get(dataset)
    if names is not None and len(names) == nclass:
        return tuple(names)
    return tuple(f"class_{i}" for i in range(nclass))


def voc_colormap(n=256):
    """The PASCAL VOC colour map: the bits of the label index are spread over R, G, B from the top bit down.

    Returns uint8 (n, 3). Label 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0), ...
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        r = g = b = 0
        c = label
        for bit in range(8):
            # Bits 0, 1, 2 of each 3-bit group go to R, G, B, filling each channel from its top bit down.
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        cmap[label] = (r, g, b)
    return cmap


def palette(dataset, nclass):
    """Colour palette uint8 (256, 3) for saving masks as paletted PNGs; index 255 (ignore) is white.

    Cityscapes and CamVid use their own colours (ids past their classes are black); every other dataset
    uses the VOC map. `nclass` is accepted for symmetry with class_names: the palette always has 256 entries.
    """
    colours = DATASET_COLORS.get(dataset)
    if colours is not None:
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[: len(colours)] = np.array(colours, dtype=np.uint8)
    else:
        pal = voc_colormap(256)
    pal[255] = (255, 255, 255)
    return pal


@dataclass(frozen=True)
class Classes:
    names: tuple[str, ...]
    palette: np.ndarray  # uint8 (256, 3): row c is the colour of class c; 255 (ignore) is white


def read_classes_file(path, nclass):
    """Names and colours from a classes file (see the module docstring); errors name the file and line.

    Classes whose line gives no colour get the VOC colour of their index.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"cannot read classes file {path}: {err.strerror or err}") from err
    pal = voc_colormap(256)
    names = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) >= 3 and all(f.lstrip("-").isdigit() for f in fields[-3:]):
            if len(fields) == 3:
                raise ValueError(
                    f"{path}:{lineno}: a class name must come before the colour: {line.strip()!r}"
                )
            colour = [int(f) for f in fields[-3:]]
            if not all(0 <= c <= 255 for c in colour):
                raise ValueError(f"{path}:{lineno}: colour values must lie in [0, 255], got {colour}")
            if len(names) < len(pal):
                pal[len(names)] = colour
            fields = fields[:-3]
        names.append(" ".join(fields))
    if len(names) != nclass:
        raise ValueError(f"classes file {path} names {len(names)} classes, but nclass is {nclass}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"classes file {path} names the class {twice[0]!r} twice")
    pal[255] = (255, 255, 255)
    return Classes(tuple(names), pal)


def dataset_classes(cfg):
    """The Classes of a config: its `classes` file, `<data_root>/classes.txt`, or the built-in ones."""
    path = cfg.get("classes")
    if path is None and cfg.get("data_root"):
        found = os.path.join(cfg["data_root"], CLASSES_FILE)
        path = found if os.path.isfile(found) else None
    if path is not None:
        return read_classes_file(path, cfg["nclass"])
    return Classes(class_names(cfg["dataset"], cfg["nclass"]), palette(cfg["dataset"], cfg["nclass"]))
