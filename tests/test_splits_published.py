"""The published partitions shipped in splits/: counts, partitions of the training list, layout, loading."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from dataset.semi import SemiDataset
from tools import make_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(ROOT, "splits")

# What the splits README documents: training-list size (None: the train2017 folder), val size, and the
# number of labeled images of every partition.
DOCUMENTED = {
    "pascal": (10582, 1449, {
        "92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464,
        "1_16": 662, "1_8": 1323, "1_4": 2646, "u2pl_1_16": 662, "u2pl_1_8": 1323, "u2pl_1_4": 2646,
    }),
    "cityscapes": (2975, 500, {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}),
    "coco": (None, 5000, {"1_512": 232, "1_256": 463, "1_128": 925, "1_64": 1849, "1_32": 3697}),
}  # fmt: skip
TRAIN_LIST = {"pascal": "train_aug.txt", "cityscapes": "train.txt"}

# The layouts the datasets are distributed in (UniMatch's Pascal and COCO, Cityscapes' own).
LAYOUT = {
    "pascal": re.compile(r"JPEGImages/(\d{4}_\d{6})\.jpg SegmentationClass/\1\.png"),
    "cityscapes": re.compile(
        r"leftImg8bit/(train|val)/([a-z]+)/(\2_\d{6}_\d{6})_leftImg8bit\.png "
        r"gtFine/\1/\2/\3_gtFine_labelTrainIds\.png"
    ),
    "coco": re.compile(r"(train2017|val2017)/(\d{12})\.jpg masks/\2\.png"),
}
VAL_PREFIX = {"pascal": "JPEGImages/", "cityscapes": "leftImg8bit/val/", "coco": "val2017/"}
TRAIN_PREFIX = {"pascal": "JPEGImages/", "cityscapes": "leftImg8bit/train/", "coco": "train2017/"}


def lines(*parts):
    with open(os.path.join(SPLITS, *parts)) as f:
        return [line.strip() for line in f if line.strip()]


def partitions():
    return [(dataset, name) for dataset, (_, _, counts) in DOCUMENTED.items() for name in counts]


def test_every_partition_folder_is_documented():
    for dataset, (_, _, counts) in DOCUMENTED.items():
        folders = {e.name for e in os.scandir(os.path.join(SPLITS, dataset)) if e.is_dir()}
        assert folders == set(counts), dataset


@pytest.mark.parametrize("dataset, name", partitions())
def test_partition(dataset, name):
    num_train, num_val, counts = DOCUMENTED[dataset]
    labeled = lines(dataset, name, "labeled.txt")
    assert len(labeled) == len(set(labeled)) == counts[name]
    assert all(LAYOUT[dataset].fullmatch(line) for line in labeled)
    assert all(line.startswith(TRAIN_PREFIX[dataset]) for line in labeled)
    assert not set(labeled) & set(lines(dataset, "val.txt"))
    if dataset == "coco":  # its unlabeled lists are written from the train2017/ folder (test below)
        return
    train = lines(dataset, TRAIN_LIST[dataset])
    unlabeled = lines(dataset, name, "unlabeled.txt")
    assert len(train) == len(set(train)) == num_train
    assert len(unlabeled) == len(set(unlabeled)) == num_train - counts[name]
    assert not set(labeled) & set(unlabeled)
    assert set(labeled) | set(unlabeled) == set(train)
    chosen = set(labeled)
    assert unlabeled == [line for line in train if line not in chosen]  # in training-list order


@pytest.mark.parametrize("dataset", DOCUMENTED)
def test_val_and_train_lists(dataset):
    num_train, num_val, _ = DOCUMENTED[dataset]
    val = lines(dataset, "val.txt")
    assert len(val) == len(set(val)) == num_val
    assert all(LAYOUT[dataset].fullmatch(line) and line.startswith(VAL_PREFIX[dataset]) for line in val)
    if dataset in TRAIN_LIST:
        train = lines(dataset, TRAIN_LIST[dataset])
        assert all(LAYOUT[dataset].fullmatch(line) for line in train)
        assert not set(train) & set(val)


def test_pascal_classic_partitions_nest_in_the_1464_fine_images():
    fine = set(lines("pascal", "1464", "labeled.txt"))
    for name in ("92", "183", "366", "732"):
        assert set(lines("pascal", name, "labeled.txt")) <= fine


def test_configs_point_into_splits():
    import yaml

    for dataset in DOCUMENTED:
        with open(os.path.join(ROOT, "configs", f"{dataset}.yaml")) as f:
            cfg = yaml.safe_load(f)
        for key in ("labeled_id_path", "val_id_path") + (("unlabeled_id_path",) if dataset != "coco" else ()):
            assert cfg[key].startswith(f"splits/{dataset}/"), key
            assert os.path.isfile(os.path.join(ROOT, cfg[key])), cfg[key]


def test_readme_names_only_shipped_split_files():
    docs = os.path.join(ROOT, "docs")
    pages = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(docs)) if n.endswith(".md")]
    named = set()
    for page in pages:
        with open(os.path.join(ROOT, page)) as f:
            named |= set(re.findall(r"splits/(?:pascal|cityscapes|coco)/[\w/]+\.txt", f.read()))
    assert named
    generated = {p for p in named if re.fullmatch(r"splits/coco/\w+/unlabeled\.txt", p)}
    assert [p for p in sorted(named - generated) if not os.path.isfile(os.path.join(ROOT, p))] == []


# ---------------------------------------------------------------------------------------------------
# Loading unchanged against the data as distributed


def image_and_mask_paths(dataset, line):
    """Where the distribution puts the files of the sample a line names, built from its id alone."""
    match = LAYOUT[dataset].fullmatch(line)
    if dataset == "pascal":
        i = match.group(1)
        return f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png"
    if dataset == "cityscapes":
        split, city, name = match.groups()
        return (
            f"leftImg8bit/{split}/{city}/{name}_leftImg8bit.png",
            f"gtFine/{split}/{city}/{name}_gtFine_labelTrainIds.png",
        )
    split, i = match.groups()
    return f"{split}/{i}.jpg", f"masks/{i}.png"  # COCO: one masks/ folder for train and val


@pytest.mark.parametrize("dataset, name", [("pascal", "92"), ("cityscapes", "1_30"), ("coco", "1_512")])
def test_shipped_lists_load_unchanged(tmp_path, dataset, name):
    labeled_path = os.path.join(SPLITS, dataset, name, "labeled.txt")
    nclass = {"pascal": 21, "cityscapes": 19, "coco": 81}[dataset]
    entries = lines(dataset, name, "labeled.txt")
    # Empty files stand in for the data (the loader checks that every listed file exists); the first
    # sample is a real image and mask.
    for k, line in enumerate(entries):
        for path in image_and_mask_paths(dataset, line):
            full = tmp_path / path
            full.parent.mkdir(parents=True, exist_ok=True)
            if k:
                full.touch()
            elif path.endswith("leftImg8bit.png") or path.endswith(".jpg"):
                Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(full)
            else:
                Image.fromarray(np.full((40, 60), nclass - 1, np.uint8)).save(full)
    data = SemiDataset(str(tmp_path), "train_l", labeled_path, nclass=nclass, crop_size=32)
    assert len(data) == len(entries)
    image, mask = data[0]
    assert image.shape == (3, 32, 32) and set(mask.unique().tolist()) <= {nclass - 1, 255}


def test_coco_unlabeled_lists_from_the_train_folder(tmp_path):
    root, splits = tmp_path / "coco", tmp_path / "splits"
    labeled = {name: lines("coco", name, "labeled.txt") for name in ("1_512", "1_256")}
    for name in labeled:
        (splits / name).mkdir(parents=True)
        with open(os.path.join(SPLITS, "coco", name, "labeled.txt"), "rb") as f:
            (splits / name / "labeled.txt").write_bytes(f.read())
    ids = {re.search(r"/(\d{12})\.jpg", line).group(1) for e in labeled.values() for line in e}
    ids |= {f"{k:012d}" for k in range(300)}  # images no partition labels
    (root / "train2017").mkdir(parents=True)
    for i in ids:
        (root / "train2017" / f"{i}.jpg").touch()
    (root / "train2017" / "notes.txt").touch()  # not an image: not listed

    make_splits.main(["coco-unlabeled", "--data-root", str(root), "--splits", str(splits)])
    train = [f"train2017/{i}.jpg masks/{i}.png" for i in sorted(ids)]
    for name, entries in labeled.items():
        with open(splits / name / "unlabeled.txt") as f:
            unlabeled = f.read().splitlines()
        assert len(unlabeled) == len(ids) - len(entries)
        assert not set(unlabeled) & set(entries) and set(unlabeled) | set(entries) == set(train)
        assert unlabeled == sorted(unlabeled)


def test_coco_unlabeled_needs_every_labeled_image(tmp_path, capsys):
    root, splits = tmp_path / "coco", tmp_path / "splits"
    (root / "train2017").mkdir(parents=True)
    (root / "train2017" / "000000000001.jpg").touch()
    (splits / "1_512").mkdir(parents=True)
    (splits / "1_512" / "labeled.txt").write_text("train2017/000000177254.jpg masks/000000177254.png\n")
    with pytest.raises(SystemExit):
        make_splits.main(["coco-unlabeled", "--data-root", str(root), "--splits", str(splits)])
    err = capsys.readouterr().err
    assert "000000177254" in err and "labeled.txt" in err
    assert not (splits / "1_512" / "unlabeled.txt").exists()
