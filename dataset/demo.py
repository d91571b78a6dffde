"""A small synthetic segmentation dataset for demos, tests and CPU smoke runs.

Each image shows a few random shapes (ellipse, rectangle, triangle, cross, ring) on a
background with a fine texture (stripes, checkerboard, blobs or grain). Every shape draws
its colour from the same distribution, so colour never tells the shape classes apart; the
background is told apart by its texture (and is darker on average, ``color_shift``), the
shapes from each other by their outlines only. Shapes vary in scale and aspect (and in
rotation with ``max_rotation``) and overlap (the mask shows the shape on top). Recognising
outlines from a handful of labeled images is hard, which leaves room for unlabeled images.

Layout (Pascal VOC style, the split files use the usual ``<image> <mask>`` lines)::

    root/JPEGImages/train_00000.jpg
    root/SegmentationClass/train_00000.png   # mode 'P', class indices, no ignore pixels
    root/splits/labeled.txt, unlabeled.txt   # a partition of the training images
    root/splits/val.txt
    root/.complete                           # written last; records the parameters (the manifest)
    root/.demo.lock                          # locked while a process generates the dataset

Usage::

    python -m dataset.demo --root data/demo [--num-train 1000] [--num-val 100] [--size 64]
"""

import argparse
import contextlib
import inspect
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from dataset.classes import DEMO_CLASSES, palette
from util.files import write_atomic
from util.lock import LockHeld, lock

MARKER = ".complete"
LOCK = ".demo.lock"  # held while a process generates the dataset (generation_lock)

# Shapes are drawn this many times larger and box-filtered down, which gives
# anti-aliased image edges; the mask takes the class where the coverage is >= 50%.
_SUPERSAMPLE = 4

# Least RGB distance between the two colours a texture blends (at contrast 1).
_TEXTURE_COLOR_DISTANCE = 120.0


def generate_demo(
    root,
    num_train=1000,
    num_val=100,
    size=64,
    labeled_fraction=0.02,
    seed=0,
    shapes_per_image=(2, 4),
    shape_size=(0.15, 0.35),
    max_rotation=0.0,
    color_shift=96.0,
    background_contrast=0.8,
    shape_texture=0.0,
    shape_shading=0.4,
    min_color_distance=60.0,
    noise_std=5.0,
    jpeg_quality=90,
):
    """Write the demo dataset to ``root`` (overwriting what is there) and return ``root``.

    Difficulty knobs (the defaults make the dataset of configs/demo.yaml):
      shapes_per_image: inclusive (min, max) number of shapes per image.
      shape_size: (min, max) shape radius as a fraction of the image size.
      max_rotation: shapes turn by U(-max_rotation, max_rotation) degrees; 0 keeps them
        upright, so edge directions help tell the classes apart.
      color_shift: background colours are drawn from U(0, 255 - shift) per channel, shape
        colours from U(shift, 255): 0 makes colour useless for telling shapes from the
        background, larger values make the background darker on average (an easy cue
        that gets training started). Colour never tells the shape classes apart.
      background_contrast: strength of the background texture; 0 gives a flat background.
      shape_texture: strength of the same kind of texture inside the shapes; with 0 only
        the texture tells the background from the shapes, at 1 it does not.
      shape_shading: strength of a smooth brightness ramp across each shape.
      min_color_distance: least RGB distance between a shape's colour and the
        background's mean colour; smaller values hide more shapes in the background.
      noise_std: standard deviation of the per-pixel Gaussian noise (0-255 scale).
      jpeg_quality: quality of the saved JPEGs (compression adds mild artefacts).
    """
    arguments = dict(locals())  # first statement: exactly the arguments, by name
    if num_train < 1:
        raise ValueError(f"num_train must be at least 1, got {num_train}")
    params = demo_params(**{k: v for k, v in arguments.items() if k != "root"})
    look = {k: v for k, v in arguments.items() if k in inspect.signature(render_sample).parameters}

    # Remove the marker first: if we are interrupted, the next ensure_demo starts over.
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    for folder in ("JPEGImages", "SegmentationClass", "splits"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)

    # Masks are saved with the palette the evaluation tools use for the demo dataset.
    mask_palette = palette("demo", len(DEMO_CLASSES)).flatten().tolist()
    ids = {
        "train": [f"train_{i:05d}" for i in range(num_train)],
        "val": [f"val_{i:05d}" for i in range(num_val)],
    }
    for split_index, split in enumerate(("train", "val")):
        for i, name in enumerate(ids[split]):
            # One generator per image: the content of an image does not depend on the others.
            rng = np.random.default_rng([seed, split_index, i])
            img, mask = render_sample(rng, **look)
            Image.fromarray(img).save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=jpeg_quality)
            mask_img = Image.fromarray(mask)
            mask_img.putpalette(mask_palette)  # turns the 'L' image into 'P', keeping the indices
            mask_img.save(os.path.join(root, "SegmentationClass", f"{name}.png"))

    num_labeled = min(max(1, round(labeled_fraction * num_train)), num_train)
    chosen = set(np.random.default_rng([seed, 2]).permutation(num_train)[:num_labeled].tolist())
    labeled = [name for i, name in enumerate(ids["train"]) if i in chosen]
    unlabeled = [name for i, name in enumerate(ids["train"]) if i not in chosen]
    write_split(os.path.join(root, "splits", "labeled.txt"), labeled)
    write_split(os.path.join(root, "splits", "unlabeled.txt"), unlabeled)
    write_split(os.path.join(root, "splits", "val.txt"), ids["val"])

    write_atomic(marker, json.dumps(params, sort_keys=True) + "\n")
    return root


def ensure_demo(root, generate=True, **kwargs):
    """Generate the demo dataset unless a complete one is there; never overwrite a complete one.

    Returns True if it generated the dataset. A complete dataset made with other parameters (recorded in
    its marker) is a ValueError naming both; so is a missing one when ``generate`` is False (``eval.py``
    reads data, it never writes any). One process generates at a time (generation_lock): another one that
    starts meanwhile waits, then finds the dataset complete, or made with other parameters (an error).
    """
    wanted = demo_params(**kwargs)
    if check_marker(root, wanted):
        return False
    if not generate:
        raise ValueError(f"no complete demo dataset in {root}: train first, or run python -m dataset.demo")
    with generation_lock(root):
        if check_marker(root, wanted):  # made by the process this one waited for
            return False
        generate_demo(root, **kwargs)
    return True


def check_marker(root, wanted):
    """True when ``root`` holds a complete demo dataset made with the parameters ``wanted``, False when it
    holds none; a ValueError naming both parameter sets when it holds one made with others."""
    found = read_marker(root)
    if found is None:
        return False
    if found == wanted:
        return True
    # Both key sets: a marker written by another version of the generator may have keys this one lacks.
    differ = sorted(k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k))
    made = ", ".join(f"{k}={found.get(k, '(none)')}" for k in differ)
    asked = ", ".join(f"{k}={wanted.get(k, '(none)')}" for k in differ)
    raise ValueError(
        f"{root} holds a demo dataset made with {made}; the config asks for {asked}. It is not "
        "overwritten: set data_root to another folder, use the parameters it was made with, or delete it "
        "to generate it again"
    )


@contextlib.contextmanager
def generation_lock(root):
    """Held while one process writes the demo dataset in ``root`` (util.lock on root/LOCK): two runs that
    start on a fresh data_root would otherwise both write into it, and the folder would end with one's
    images and the other's marker. Another process's generation is waited for, with a note that says so."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    try:
        try:
            held = lock(path)
        except LockHeld as other:
            print(
                f"waiting for {other.holder}, which is generating the demo dataset in {root}",
                file=sys.stderr,
                flush=True,
            )
            held = lock(path, wait=True)
    except OSError as err:
        print(
            f"warning: cannot lock {path} ({err.strerror or err}): two processes generating the demo "
            "dataset there at once are not prevented",
            file=sys.stderr,
        )
        held = None
    try:
        yield
    finally:
        if held is not None:
            held.close()


def read_marker(root):
    """The parameters a complete demo dataset in ``root`` was made with, or None."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def demo_params(**kwargs):
    """The parameters ``generate_demo`` would record in its marker for these arguments."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(generate_demo).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown demo parameters: {sorted(unknown)}")
    params = {**defaults, **kwargs}
    for key in ("shapes_per_image", "shape_size"):
        params[key] = list(params[key])
    return json.loads(json.dumps(params, sort_keys=True))


def write_split(path, names):
    lines = [f"JPEGImages/{name}.jpg SegmentationClass/{name}.png\n" for name in names]
    write_atomic(path, "".join(lines))


def render_sample(
    rng,
    size,
    shapes_per_image,
    shape_size,
    max_rotation,
    color_shift,
    background_contrast,
    shape_texture,
    shape_shading,
    min_color_distance,
    noise_std,
):
    """One image (H, W, 3) uint8 and its mask (H, W) uint8."""
    # Background: two random colours blended by a texture. All shapes take their colours
    # from one distribution, so colour never tells the shape classes apart; the
    # background's colours overlap it, a little darker on average (color_shift).
    bg_colors = two_colors(rng, background_contrast, 0, 255 - color_shift)
    img = paint(random_texture(rng, size), bg_colors)
    bg_mean = bg_colors.mean(axis=0)
    mask = np.zeros((size, size), dtype=np.uint8)

    for _ in range(rng.integers(shapes_per_image[0], shapes_per_image[1] + 1)):
        cls = int(rng.integers(1, len(DEMO_CLASSES)))
        coverage = shape_coverage(rng, cls, size, shape_size, max_rotation)
        # Redraw colours that would make the shape (almost) invisible on the background.
        for _ in range(20):
            colors = two_colors(rng, shape_texture, color_shift, 255)
            if np.linalg.norm(colors[0] - bg_mean) >= min_color_distance:
                break
        fill = paint(random_texture(rng, size), colors) * shading(rng, size, shape_shading)[..., None]
        alpha = coverage[..., None]
        img = img * (1 - alpha) + fill * alpha
        mask[coverage >= 0.5] = cls  # later shapes occlude earlier ones

    img = img + rng.normal(0.0, noise_std, img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask


def two_colors(rng, contrast, low=0, high=255):
    """Two RGB colours (2, 3) in [low, high]: a uniform one, and one ``contrast`` of the way to another.

    The other colour is drawn far enough away that ``contrast`` alone sets how visible
    a texture painted with the pair is.
    """
    first = rng.uniform(low, high, 3)
    for _ in range(20):
        other = rng.uniform(low, high, 3)
        if np.linalg.norm(other - first) >= _TEXTURE_COLOR_DISTANCE:
            break
    return np.stack([first, first + contrast * (other - first)])


def paint(texture, colors):
    """Blend two colours with a texture in [0, 1] -> float image (H, W, 3)."""
    return colors[0] + texture[..., None] * (colors[1] - colors[0])


def random_texture(rng, size):
    """A (size, size) field in [0, 1]: stripes, blobs, grain or a checkerboard."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    kind = rng.integers(4)
    if kind == 0:  # stripes
        cycles = rng.uniform(0.1, 0.2) * size
        return 0.5 + 0.5 * np.sin(2 * math.pi * cycles * along + rng.uniform(0, 2 * math.pi))
    if kind == 1:  # rotated checkerboard
        cycles = rng.uniform(0.06, 0.12) * size
        return ((np.floor(cycles * along) + np.floor(cycles * across)) % 2).astype(np.float64)
    # Blobs (coarse grid) or grain (fine grid): random values upsampled smoothly.
    cells = max(2, int(rng.uniform(0.12, 0.2) * size) if kind == 2 else size // 4)
    coarse = Image.fromarray(rng.uniform(0, 1, (cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.BICUBIC)).clip(0, 1).astype(np.float64)


def shading(rng, size, strength):
    """A smooth brightness ramp (size, size) around 1, for a little 3-D look."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = xx * math.cos(angle) + yy * math.sin(angle)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    return 1 + strength * (ramp - 0.5)


def shape_coverage(rng, cls, size, shape_size, max_rotation=0.0):
    """Draw one shape of class ``cls`` at a random place, scale and angle.

    Returns its coverage (size, size) in [0, 1] (the anti-aliased alpha).
    """
    big = size * _SUPERSAMPLE
    radius = rng.uniform(*shape_size) * big
    center = rng.uniform(0.1, 0.9, 2) * big
    angle = math.radians(rng.uniform(-max_rotation, max_rotation))

    name = DEMO_CLASSES[cls]
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "ellipse":
        draw.polygon(place(ellipse(radius, radius * rng.uniform(0.5, 1.0)), center, angle), fill=255)
    elif name == "rectangle":
        half_w, half_h = radius, radius * rng.uniform(0.4, 1.0)
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        draw.polygon(place(np.array(corners), center, angle), fill=255)
    elif name == "triangle":
        corner_angles = math.pi / 2 + 2 * math.pi / 3 * np.arange(3) + rng.uniform(-0.25, 0.25, 3)
        corner_radii = radius * rng.uniform(0.85, 1.15, 3)
        corners = np.stack([corner_radii * np.cos(corner_angles), corner_radii * np.sin(corner_angles)], 1)
        draw.polygon(place(corners, center, angle), fill=255)
    elif name == "cross":
        arm = radius * rng.uniform(0.25, 0.4)
        r = radius
        outline = [(-arm, -r), (arm, -r), (arm, -arm), (r, -arm), (r, arm), (arm, arm)]
        outline += [(arm, r), (-arm, r), (-arm, arm), (-r, arm), (-r, -arm), (-arm, -arm)]
        draw.polygon(place(np.array(outline), center, angle), fill=255)
    elif name == "ring":
        outer = ellipse(radius, radius * rng.uniform(0.75, 1.0))
        draw.polygon(place(outer, center, angle), fill=255)
        draw.polygon(place(outer * rng.uniform(0.45, 0.65), center, angle), fill=0)
    else:
        raise ValueError(f"not a shape class: {cls}")

    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def ellipse(half_w, half_h, points=48):
    t = np.linspace(0, 2 * math.pi, points, endpoint=False)
    return np.stack([half_w * np.cos(t), half_h * np.sin(t)], 1)


def place(points, center, angle):
    """Rotate (N, 2) points about the origin, move them to ``center``; a list for ImageDraw."""
    c, s = math.cos(angle), math.sin(angle)
    rotated = points @ np.array([[c, s], [-s, c]])
    return [tuple(p) for p in (rotated + center).tolist()]


def main(argv=None):
    defaults = demo_params()
    parser = argparse.ArgumentParser(description="Generate the synthetic demo segmentation dataset.")
    parser.add_argument("--root", default="data/demo")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete copy exists")
    for name, value in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, type=type(value[0]), nargs=2, default=value, metavar=("MIN", "MAX"))
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    args = vars(parser.parse_args(argv))
    root, force = args.pop("root"), args.pop("force")

    if force:
        with generation_lock(root):
            generate_demo(root, **args)
        generated = True
    else:
        try:
            generated = ensure_demo(root, **args)
        except ValueError as err:
            raise SystemExit(f"error: {err} (or pass --force to overwrite it)") from None
    print(f"{'wrote' if generated else 'found complete'} demo dataset in {root}")


if __name__ == "__main__":
    main()
