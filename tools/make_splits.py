"""Write labeled/unlabeled split files in UniMatch's format.

Every split is a folder with ``labeled.txt`` and ``unlabeled.txt``, one ``<image> <mask>`` line per
sample, paths relative to the dataset root.

The published partitions of Pascal, Cityscapes and COCO are shipped in ``splits/`` (copied unchanged from
UniMatch's release); use those to compare with published tables. COCO's unlabeled lists (118k lines each)
are not shipped; write them from the ``train2017/`` folder (every training image not in labeled.txt)::

    python tools/make_splits.py coco-unlabeled --data-root /data/coco        # splits/coco/*/unlabeled.txt

The unlabeled list of any labeled list: the training list minus the labeled lines, in training-list order
(how the shipped Pascal and Cityscapes unlabeled lists were made)::

    python tools/make_splits.py unlabeled --train-list splits/pascal/train_aug.txt \
        --labeled splits/pascal/366/labeled.txt --out splits/pascal/366/unlabeled.txt

Your own dataset, from a list of training lines (and optionally a pool to draw the labeled images from).
The labeled set is ``random.Random(seed).sample`` over the sorted pool; the unlabeled set is the rest of
the training list, in file order. Same inputs and seed, same bytes::

    python tools/make_splits.py custom --train-list train.txt --num 100 --out splits/mine/100
    python tools/make_splits.py custom --train-list train.txt --fraction 1/8 --out splits/mine/1_8

New random draws of the standard datasets' partitions (these are NOT the published splits: numbers
trained on them are not comparable with published tables)::

    # Pascal VOC 2012 + SBD masks (SegmentationClass/ with train_aug and val masks):
    #   92/ 183/ 366/ 732/ 1464/  labeled from the 1464 classic train images
    #   1_16/ 1_8/ 1_4/ 1_2/      labeled from all 10582 train_aug images
    python tools/make_splits.py pascal --data-root /data/VOC2012 --out splits/pascal_seed1 --seed 1

    # Cityscapes (needs *_gtFine_labelTrainIds.png): 1_16/ 1_8/ 1_4/ 1_2/
    python tools/make_splits.py cityscapes --data-root /data/cityscapes --out splits/cityscapes_seed1 --seed 1

    # COCO 2017, UniMatch's layout (train2017/, val2017/, masks/<id>.png for both): 1_512/ ... 1_32/
    python tools/make_splits.py coco --data-root /data/coco --out splits/coco_seed1 --seed 1

Each preset also writes ``val.txt`` (and ``train.txt``, the full training list).
Fractions are rounded up, as in UniMatch's published splits (1/16 of 10582 -> 662).

CamVid, from the SegNet release (``train/``, ``trainannot/``, ``val/``, ``valannot/``, ``test/``,
``testannot/``), converted into the project's layout in the data root: ``JPEGImages/``,
``SegmentationClass/`` (void 11 -> 255), ``classes.txt`` and the lists ``train.txt``, ``val.txt``,
``test.txt`` (dataset/camvid.py). ``--scale 0.25`` gives 120x90, the resolution of configs/camvid.yaml::

    python tools/make_splits.py camvid --source CamVid --data-root data/camvid --scale 0.25

and seeded labeled draws from its ``train.txt`` (``<n>/labeled.txt``, ``<n>/unlabeled.txt``, and copies of
``train.txt`` and ``val.txt``). The partitions of the README's CamVid table are the ones shipped in
``splits/camvid/`` (not drawn by this command); a new draw is another partition::

    python tools/make_splits.py camvid --data-root data/camvid --labeled 12 23 46 92 --seed 1 \
        --out splits/camvid_seed1

Both leave a file that already holds the same content as it is and stop, writing nothing, where one holds
other content (``--overwrite`` replaces it).
"""

import argparse
import glob
import math
import os
import random
import sys
from collections import Counter
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.camvid import convert_camvid  # noqa: E402
from util.files import holds_text, write_atomic  # noqa: E402

PASCAL_COUNTS = (92, 183, 366, 732, 1464)
PASCAL_FRACTIONS = ("1_16", "1_8", "1_4", "1_2")
CITYSCAPES_FRACTIONS = ("1_16", "1_8", "1_4", "1_2")
COCO_FRACTIONS = ("1_512", "1_256", "1_128", "1_64", "1_32")
CAMVID_COUNTS = (12, 23, 46, 92)


# ---------------------------------------------------------------------------
# Core: sample a labeled subset, the rest is unlabeled


def read_list(path):
    """Non-blank lines of a split file, stripped, in order; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list not found: {path}")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"list is empty: {path}")
    return lines


def parse_fraction(text):
    """'1/8', '1_8' or '0.125' -> a Fraction in (0, 1]."""
    value = Fraction(str(text).replace("_", "/"))
    if not 0 < value <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {text}")
    return value


def count_for_fraction(fraction, total):
    """Number of labeled samples for a fraction: rounded up, at least one."""
    # Exact arithmetic: 1/2 of 2975 is 1487.5 -> 1488, and 1/16 of 10582 -> 662.
    return max(1, math.ceil(parse_fraction(fraction) * total))


def split_labeled(
    train, pool=None, num=None, fraction=None, seed=0, train_name="train list", pool_name="pool"
):
    """Draw ``num`` (or ``fraction`` of the pool) labeled lines from ``pool``.

    ``pool`` defaults to ``train``. Returns ``(labeled, unlabeled)``, both in the order
    of ``train``; together they partition ``train``.
    """
    if (num is None) == (fraction is None):
        raise ValueError("give exactly one of num and fraction")
    if not train:
        raise ValueError(f"{train_name} is empty")
    check_unique(train, train_name)
    if pool is None:
        pool, pool_name = train, train_name
    if not pool:
        raise ValueError(f"{pool_name} is empty")
    check_unique(pool, pool_name)
    outside = sorted(set(pool) - set(train))
    if outside:
        raise ValueError(
            f"{len(outside)} line(s) of {pool_name} are not in {train_name}, e.g. {outside[0]!r}"
        )

    if num is None:
        num = count_for_fraction(fraction, len(pool))
    if not 0 < num <= len(pool):
        raise ValueError(f"cannot draw {num} labeled samples from {pool_name}, which has {len(pool)} lines")

    # Sorting first makes the draw independent of the order of the pool file.
    chosen = set(random.Random(seed).sample(sorted(pool), num))
    labeled = [line for line in train if line in chosen]
    unlabeled = [line for line in train if line not in chosen]
    return labeled, unlabeled


def complement(train, labeled, train_name="train list", labeled_name="labeled list"):
    """The lines of ``train`` that are not in ``labeled``, in training-list order.

    Every labeled line must be a training line (else the two lists do not describe one dataset).
    """
    check_unique(train, train_name)
    check_unique(labeled, labeled_name)
    train_set = set(train)
    outside = [line for line in labeled if line not in train_set]
    if outside:
        raise ValueError(
            f"{len(outside)} line(s) of {labeled_name} are not in {train_name}, e.g. {outside[0]!r}"
        )
    chosen = set(labeled)
    return [line for line in train if line not in chosen]


def check_unique(lines, name):
    seen = set()
    for line in lines:
        if line in seen:
            raise ValueError(f"{name} lists {line!r} more than once")
        seen.add(line)


def list_text(lines):
    return "".join(line + "\n" for line in lines)


def write_list(path, lines):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, list_text(lines))


def write_lists_or_none(out, lists, overwrite=False):
    """Write ``lists`` (path relative to ``out`` -> lines), or, where a file there already holds other lines
    and not ``overwrite``, nothing: a new draw never replaces a partition unasked."""
    texts = {os.path.join(out, name): list_text(lines) for name, lines in lists.items()}
    different = [path for path, text in texts.items() if os.path.exists(path) and not holds_text(path, text)]
    if different and not overwrite:
        raise FileExistsError(
            f"{len(different)} file(s) in {out} hold other lines, e.g. {different[0]}; nothing was written "
            "(pass --overwrite to replace them)"
        )
    for path, text in texts.items():
        if not holds_text(path, text):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, text)


def write_split(out_dir, labeled, unlabeled):
    write_list(os.path.join(out_dir, "labeled.txt"), labeled)
    write_list(os.path.join(out_dir, "unlabeled.txt"), unlabeled)
    print(f"{out_dir}: {len(labeled)} labeled, {len(unlabeled)} unlabeled")


# ---------------------------------------------------------------------------
# Training / validation lists of the standard datasets


def pascal_lists(data_root):
    """Pascal VOC 2012 with UniMatch's SegmentationClass/ (SBD-augmented masks).

    Returns ``(train_aug, classic_train, val)``: every mask that is not a validation
    image (10582 when complete), the 1464 classic training images, the 1449 val images.
    """
    sets = os.path.join(data_root, "ImageSets", "Segmentation")
    val_ids = read_list(os.path.join(sets, "val.txt"))
    train_ids = read_list(os.path.join(sets, "train.txt"))
    mask_dir = os.path.join(data_root, "SegmentationClass")
    mask_ids = sorted(os.path.splitext(name)[0] for name in os.listdir(mask_dir) if name.endswith(".png"))

    val_set = set(val_ids)
    aug_ids = [i for i in mask_ids if i not in val_set]
    missing = sorted(set(train_ids) - set(aug_ids))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} ids of {sets}/train.txt have no mask in {mask_dir}, e.g. {missing[0]}"
        )
    missing = sorted(val_set - set(mask_ids))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} ids of {sets}/val.txt have no mask in {mask_dir}, e.g. {missing[0]}"
        )
    if len(aug_ids) != 10582:
        print(
            f"note: {mask_dir} holds {len(aug_ids)} training masks (10582 with the full SBD set)",
            file=sys.stderr,
        )

    def line(i):
        return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png"

    return [line(i) for i in aug_ids], [line(i) for i in train_ids], [line(i) for i in val_ids]


def cityscapes_list(data_root, split):
    """``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with its labelTrainIds mask."""
    suffix = "_leftImg8bit.png"
    images = sorted(glob.glob(os.path.join(data_root, "leftImg8bit", split, "*", "*" + suffix)))
    if not images:
        raise FileNotFoundError(f"no *{suffix} images in {os.path.join(data_root, 'leftImg8bit', split)}")
    lines, missing = [], []
    for path in images:
        city = os.path.basename(os.path.dirname(path))
        name = os.path.basename(path)[: -len(suffix)]
        image = f"leftImg8bit/{split}/{city}/{name}{suffix}"
        mask = f"gtFine/{split}/{city}/{name}_gtFine_labelTrainIds.png"
        if not os.path.isfile(os.path.join(data_root, mask)):
            missing.append(mask)
        lines.append(f"{image} {mask}")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} Cityscapes masks are missing, e.g. {os.path.join(data_root, missing[0])} "
            "(create the *_labelTrainIds.png files with cityscapesscripts' createTrainIdLabelImgs)"
        )
    return lines


def coco_list(data_root, split, check_masks=True):
    """``<split>/<id>.jpg masks/<id>.png`` (UniMatch's COCO layout: one masks/ folder for train and val)."""
    images = sorted(glob.glob(os.path.join(glob.escape(data_root), split, "*.jpg")))
    if not images:
        raise FileNotFoundError(f"no .jpg images in {os.path.join(data_root, split)}")
    lines, missing = [], []
    for path in images:
        name = os.path.splitext(os.path.basename(path))[0]
        mask = f"masks/{name}.png"
        if check_masks and not os.path.isfile(os.path.join(data_root, mask)):
            missing.append(mask)
        lines.append(f"{split}/{name}.jpg {mask}")
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} COCO masks are missing, e.g. {os.path.join(data_root, missing[0])}"
        )
    return lines


# ---------------------------------------------------------------------------
# Presets


def write_pascal(data_root, out, seed=0):
    train_aug, classic, val = pascal_lists(data_root)
    write_list(os.path.join(out, "train.txt"), train_aug)
    write_list(os.path.join(out, "val.txt"), val)
    for num in PASCAL_COUNTS:
        if num > len(classic):
            print(f"skipping {num}: the classic train list has only {len(classic)} images", file=sys.stderr)
            continue
        labeled, unlabeled = split_labeled(
            train_aug, classic, num=num, seed=seed, pool_name="classic train list"
        )
        write_split(os.path.join(out, str(num)), labeled, unlabeled)
    for name in PASCAL_FRACTIONS:
        write_split(os.path.join(out, name), *split_labeled(train_aug, fraction=name, seed=seed))


def write_fraction_preset(train, val, out, fractions, seed=0):
    write_list(os.path.join(out, "train.txt"), train)
    write_list(os.path.join(out, "val.txt"), val)
    for name in fractions:
        write_split(os.path.join(out, name), *split_labeled(train, fraction=name, seed=seed))


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def folder_lists(data_root, images="images", masks="masks", val="0", seed=0):
    """Lists of a folder of images, some or all with a mask: ``(train, masked, val)``.

    ``<images>/<path>.<ext>`` pairs with ``<masks>/<path>.png`` (same relative path, any image extension).
    Images without a mask are unlabeled-only: their lines have no mask column. ``val`` masked images
    (a count like 50, or a fraction like 1/10; seeded) are held out for validation; ``train`` is every
    other image and ``masked`` its lines that have a mask (the pool to draw labeled images from).
    """
    image_root = os.path.join(data_root, images)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"image folder not found: {image_root}")
    lines = []
    for folder, dirs, names in os.walk(image_root):
        dirs.sort()
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            relative = os.path.relpath(os.path.join(folder, stem), image_root).replace(os.sep, "/")
            image = f"{images}/{relative}{ext}"
            if " " in image:
                raise ValueError(f"split files cannot hold paths with spaces: {image!r}")
            mask = f"{masks}/{relative}.png"
            has_mask = os.path.isfile(os.path.join(data_root, mask))
            lines.append(f"{image} {mask}" if has_mask else image)
    if not lines:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_root}")
    twice = sorted(
        s for s, n in Counter(line.split()[0].rsplit(".", 1)[0] for line in lines).items() if n > 1
    )
    if twice:
        raise ValueError(f"two images share a name (their masks would be one file): {twice[0]}.*")

    masked = [line for line in lines if " " in line]
    num_val = 0
    if val not in ("0", 0, None):
        num_val = count_for_fraction(val, len(masked)) if any(c in str(val) for c in "/_.") else int(val)
    if num_val >= len(masked) and num_val > 0:
        raise ValueError(f"cannot hold out {num_val} validation images: {len(masked)} images have a mask")
    held_out = set(random.Random(seed).sample(sorted(masked), num_val))
    train = [line for line in lines if line not in held_out]
    return (
        train,
        [line for line in masked if line not in held_out],
        [line for line in masked if line in held_out],
    )


def camvid_draws(data_root, counts=CAMVID_COUNTS, seed=0):
    """Seeded labeled draws from a converted CamVid's train.txt: file name -> lines.

    ``<n>/labeled.txt`` is ``split_labeled``'s draw of n training lines, ``<n>/unlabeled.txt`` the rest of
    the training list; ``train.txt`` and ``val.txt`` are copies of the data root's, beside the partitions.
    """
    train_path, val_path = os.path.join(data_root, "train.txt"), os.path.join(data_root, "val.txt")
    for path in (train_path, val_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: convert CamVid into {data_root} first (--source)")
    train = read_list(train_path)
    lists = {"train.txt": train, "val.txt": read_list(val_path)}
    for num in counts:
        labeled, unlabeled = split_labeled(train, num=num, seed=seed, train_name=train_path)
        lists[f"{num}/labeled.txt"] = labeled
        lists[f"{num}/unlabeled.txt"] = unlabeled
    return lists


def parse_size(text):
    """'120x90' -> (120, 90), width first."""
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 120x90, got {text!r}")
    return int(width), int(height)


def write_coco_unlabeled(data_root, splits):
    """unlabeled.txt beside every labeled.txt under ``splits``: the train2017/ images not labeled."""
    # Unlabeled images need no mask, so the masks are not looked for.
    train = coco_list(data_root, "train2017", check_masks=False)
    if len(train) != 118287:
        print(f"note: {data_root}/train2017 holds {len(train)} images (118287 in COCO 2017)", file=sys.stderr)
    folders = sorted(
        os.path.dirname(path) for path in glob.glob(os.path.join(glob.escape(splits), "*", "labeled.txt"))
    )
    if not folders:
        raise FileNotFoundError(f"no */labeled.txt under {splits}")
    for folder in folders:
        labeled_path = os.path.join(folder, "labeled.txt")
        labeled = read_list(labeled_path)
        unlabeled = complement(train, labeled, f"{data_root}/train2017", labeled_path)
        write_list(os.path.join(folder, "unlabeled.txt"), unlabeled)
        print(f"{folder}: {len(labeled)} labeled, {len(unlabeled)} unlabeled")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("pascal", "cityscapes", "coco"):
        preset = commands.add_parser(name, help=f"new random draws of the {name} partitions")
        preset.add_argument("--data-root", required=True)
        preset.add_argument(
            "--out", required=True, help="a new folder (splits/<name> holds the published ones)"
        )
        preset.add_argument("--seed", type=int, default=0)
    coco_u = commands.add_parser("coco-unlabeled", help="COCO's unlabeled lists from train2017/")
    coco_u.add_argument("--data-root", required=True, help="the folder holding train2017/")
    coco_u.add_argument("--splits", default=os.path.join("splits", "coco"), help="folder of */labeled.txt")
    rest = commands.add_parser("unlabeled", help="the training lines that a labeled list leaves out")
    rest.add_argument("--train-list", required=True)
    rest.add_argument("--labeled", required=True)
    rest.add_argument("--out", required=True, help="the unlabeled list to write")
    folder = commands.add_parser("folder", help="train/val lists of a folder of images and masks")
    folder.add_argument("--data-root", required=True, help="the dataset folder (the config's data_root)")
    folder.add_argument("--images", default="images", help="its subfolder of images (default: images)")
    folder.add_argument("--masks", default="masks", help="its subfolder of .png masks (default: masks)")
    folder.add_argument("--val", default="0", help="masked images held out for validation: 50 or 1/10")
    folder.add_argument("--out", required=True, help="folder for train.txt, masked.txt and val.txt")
    folder.add_argument("--seed", type=int, default=0)
    camvid = commands.add_parser(
        "camvid", help="convert the SegNet release of CamVid; seeded labeled draws from it"
    )
    camvid.add_argument("--data-root", required=True, help="the converted dataset (the config's data_root)")
    camvid.add_argument("--source", help="the SegNet release's CamVid folder: convert it into --data-root")
    resize = camvid.add_mutually_exclusive_group()
    resize.add_argument("--scale", type=float, help="resize every image by this factor (0.25: 120x90)")
    resize.add_argument("--size", type=parse_size, help="resize every image to WIDTHxHEIGHT, e.g. 120x90")
    camvid.add_argument(
        "--labeled", type=int, nargs="+", help=f"labeled counts to draw (default: {CAMVID_COUNTS})"
    )
    camvid.add_argument("--out", help="folder for the draws: <n>/labeled.txt, <n>/unlabeled.txt")
    camvid.add_argument("--seed", type=int, default=0)
    camvid.add_argument("--overwrite", action="store_true", help="replace files that hold other content")
    custom = commands.add_parser("custom", help="one split from a training list")
    custom.add_argument("--train-list", required=True, help="all training lines '<image> <mask>'")
    custom.add_argument("--pool", help="draw the labeled lines from this subset of the training list")
    amount = custom.add_mutually_exclusive_group(required=True)
    amount.add_argument("--num", type=int, help="number of labeled samples")
    amount.add_argument("--fraction", help="fraction of the pool, e.g. 1/8, 1_8 or 0.125 (rounded up)")
    custom.add_argument("--out", required=True, help="folder for labeled.txt and unlabeled.txt")
    custom.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "camvid":
        if args.source is None and args.out is None:
            parser.error("camvid: give --source (convert), --out (draw partitions) or both")
        if args.source is None and (args.scale is not None or args.size is not None):
            parser.error("camvid: --scale and --size resize what --source converts")
        if args.out is None and args.labeled is not None:
            parser.error("camvid: --labeled needs --out, the folder for the partitions")

    try:
        if args.command == "pascal":
            write_pascal(args.data_root, args.out, args.seed)
        elif args.command == "cityscapes":
            train = cityscapes_list(args.data_root, "train")
            val = cityscapes_list(args.data_root, "val")
            write_fraction_preset(train, val, args.out, CITYSCAPES_FRACTIONS, args.seed)
        elif args.command == "coco":
            train = coco_list(args.data_root, "train2017")
            val = coco_list(args.data_root, "val2017")
            write_fraction_preset(train, val, args.out, COCO_FRACTIONS, args.seed)
        elif args.command == "folder":
            train, masked, val = folder_lists(args.data_root, args.images, args.masks, args.val, args.seed)
            write_list(os.path.join(args.out, "train.txt"), train)
            write_list(os.path.join(args.out, "masked.txt"), masked)
            if val:
                write_list(os.path.join(args.out, "val.txt"), val)
            print(f"{args.out}: {len(train)} training images ({len(masked)} with a mask), {len(val)} val")
        elif args.command == "camvid":
            if args.source is not None:
                done = convert_camvid(args.source, args.data_root, args.scale, args.size, args.overwrite)
                counts = ", ".join(f"{num} {split}" for split, num in done.counts)
                sizes = ", ".join(f"{w}x{h}" for w, h in done.sizes)
                print(
                    f"{args.data_root}: {counts} images at {sizes} ({done.converted} written, "
                    f"{done.unchanged} already there)"
                )
            if args.out is not None:
                counts = args.labeled or CAMVID_COUNTS
                write_lists_or_none(args.out, camvid_draws(args.data_root, counts, args.seed), args.overwrite)
                for num in counts:
                    print(f"{os.path.join(args.out, str(num))}: {num} labeled (seed {args.seed})")
        elif args.command == "coco-unlabeled":
            write_coco_unlabeled(args.data_root, args.splits)
        elif args.command == "unlabeled":
            labeled = read_list(args.labeled)
            unlabeled = complement(read_list(args.train_list), labeled, args.train_list, args.labeled)
            write_list(args.out, unlabeled)
            print(f"{args.out}: {len(unlabeled)} unlabeled ({len(labeled)} labeled)")
        else:
            train = read_list(args.train_list)
            pool = read_list(args.pool) if args.pool else None
            labeled, unlabeled = split_labeled(
                train,
                pool,
                num=args.num,
                fraction=args.fraction,
                seed=args.seed,
                train_name=args.train_list,
                pool_name=args.pool or "pool",
            )
            no_mask = [line for line in labeled if len(line.split()) < 2]
            if no_mask:
                raise ValueError(
                    f"{len(no_mask)} drawn labeled line(s) have no mask, e.g. {no_mask[0]!r}: draw from the "
                    "images that have one with --pool (make_splits.py folder writes it as masked.txt)"
                )
            write_split(args.out, labeled, unlabeled)
    except (OSError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
