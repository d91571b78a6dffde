"""Custom data: classes files, and split files from a folder of images and (some) masks."""

import os

import numpy as np
import pytest
from PIL import Image

from dataset.classes import dataset_classes, read_classes_file, voc_colormap
from dataset.semi import SemiDataset
from tools import make_splits


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


# ---------------------------------------------------------------------------------------------------
# classes files


def test_classes_file_names_and_colours(tmp_path):
    path = write(
        tmp_path / "classes.txt",
        "# my data\n\nbackground 0 0 0\ncrack\t255 10 0\nroad sign  0 0 255\nrust\n",
    )
    classes = read_classes_file(path, 4)
    assert classes.names == ("background", "crack", "road sign", "rust")
    assert classes.palette.shape == (256, 3) and classes.palette.dtype == np.uint8
    assert classes.palette[:3].tolist() == [[0, 0, 0], [255, 10, 0], [0, 0, 255]]
    assert classes.palette[3].tolist() == voc_colormap(256)[3].tolist()  # no colour given: VOC's
    assert classes.palette[255].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a\nb\n", "names 2 classes, but nclass is 3"),
        ("a\nb 1 2 300\nc\n", r":2: colour values must lie in \[0, 255\]"),
        ("a\nb\na 1 2 3\n", "names the class 'a' twice"),
        ("a\n1 2 3\nc\n", ":2: a class name must come before the colour"),
    ],
)
def test_bad_classes_files_name_the_file(tmp_path, text, message):
    path = write(tmp_path / "mine.txt", text)
    with pytest.raises(ValueError, match=message) as info:
        read_classes_file(path, 3)
    assert "mine.txt" in str(info.value)


def test_dataset_classes_sources(tmp_path):
    cfg = {"dataset": "mine", "nclass": 2, "data_root": str(tmp_path / "data")}
    assert dataset_classes(cfg).names == ("class_0", "class_1")  # nothing given
    write(tmp_path / "data" / "classes.txt", "sky 0 0 255\nground 0 255 0\n")
    found = dataset_classes(cfg)
    assert found.names == ("sky", "ground") and found.palette[1].tolist() == [0, 255, 0]
    explicit = write(tmp_path / "other.txt", "water\nland\n")
    assert dataset_classes({**cfg, "classes": explicit}).names == ("water", "land")
    pascal = dataset_classes({"dataset": "pascal", "nclass": 21, "data_root": str(tmp_path)})
    assert pascal.names[15] == "person" and pascal.palette[1].tolist() == [128, 0, 0]


# ---------------------------------------------------------------------------------------------------
# make_splits folder / custom on a folder of images and masks


def make_folder(root, masked=12, unmasked=5):
    """images/ (jpg and png, one in a subfolder, a README), masks/ for the first `masked` images."""
    rng = np.random.default_rng(0)
    for k in range(masked + unmasked):
        sub = "site_b/" if k % 7 == 3 else ""
        ext = ".png" if k % 2 else ".jpg"
        image = root / "images" / f"{sub}img_{k:03d}{ext}"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + k, 30, 3), dtype=np.uint8)).save(image)
        if k < masked:
            mask = root / "masks" / f"{sub}img_{k:03d}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 3, (20 + k, 30), dtype=np.uint8)).save(mask)
    write(root / "images" / "README.md", "not an image\n")


def test_folder_lists_and_a_custom_split_load(tmp_path):
    root = tmp_path / "mine"
    make_folder(root)
    out = tmp_path / "splits"
    make_splits.main(["folder", "--data-root", str(root), "--val", "3", "--out", str(out)])
    train, masked, val = (read_lines(out / f"{n}.txt") for n in ("train", "masked", "val"))
    assert len(train) == 14 and len(masked) == 9 and len(val) == 3
    assert not set(val) & set(train) and set(masked) <= set(train)
    assert "images/site_b/img_003.png masks/site_b/img_003.png" in masked + val
    assert "images/img_013.png" in train  # no mask: an unlabeled-only line
    assert all(len(line.split()) == 2 for line in masked + val)
    assert not any("README" in line for line in train)

    make_splits.main(
        ["custom", "--train-list", str(out / "train.txt"), "--pool", str(out / "masked.txt"), "--num", "4",
         "--out", str(out / "4")]
    )  # fmt: skip
    labeled, unlabeled = read_lines(out / "4" / "labeled.txt"), read_lines(out / "4" / "unlabeled.txt")
    assert len(labeled) == 4 and set(labeled) <= set(masked) and sorted(labeled + unlabeled) == sorted(train)

    # the lists load as training and validation data
    for mode, path in (("train_l", "4/labeled.txt"), ("train_u", "4/unlabeled.txt"), ("val", "val.txt")):
        data = SemiDataset(str(root), mode, str(out / path), nclass=3, crop_size=16)
        assert len(data[0]) == {"train_l": 2, "train_u": 6, "val": 3}[mode]

    # same inputs, same bytes; another seed, another validation set
    first = (out / "val.txt").read_bytes()
    make_splits.main(["folder", "--data-root", str(root), "--val", "1/4", "--out", str(out)])
    assert (out / "val.txt").read_bytes() == first
    make_splits.main(["folder", "--data-root", str(root), "--val", "3", "--seed", "1", "--out", str(out)])
    assert (out / "val.txt").read_bytes() != first


def test_custom_refuses_labeled_lines_without_masks(tmp_path, capsys):
    root = tmp_path / "mine"
    make_folder(root, masked=2, unmasked=10)
    out = tmp_path / "splits"
    make_splits.main(["folder", "--data-root", str(root), "--out", str(out)])
    with pytest.raises(SystemExit):
        make_splits.main(
            ["custom", "--train-list", str(out / "train.txt"), "--num", "8", "--out", str(out / "8")]
        )
    err = capsys.readouterr().err
    assert "have no mask" in err and "--pool" in err
    assert not (out / "8").exists()


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda root: None, ["--images", "pics"], "image folder not found"),
        (lambda root: (root / "images" / "img_000.png").write_bytes(b""), [], "share a name"),
        (lambda root: None, ["--val", "12"], "cannot hold out 12 validation images"),
    ],
)
def test_folder_errors(tmp_path, capsys, setup, args, message):
    root = tmp_path / "mine"
    make_folder(root)
    setup(root)
    with pytest.raises(SystemExit):
        make_splits.main(["folder", "--data-root", str(root), *args, "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
