"""The synthetic demo dataset and the split writer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dataset import demo
from dataset.demo import DEMO_CLASSES, ensure_demo, generate_demo
from dataset.semi import SemiDataset
from tests.test_training import ROOT
from tools import make_splits

TINY = dict(num_train=40, num_val=8, size=48, labeled_fraction=0.1)


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def dataset_bytes(root):
    """Every file of a generated dataset, by relative path."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    generate_demo(root, **TINY)
    return root


# ---------------------------------------------------------------------------
# Demo dataset


def test_demo_files_and_masks(demo_root):
    splits = {
        name: read_lines(os.path.join(demo_root, "splits", f"{name}.txt"))
        for name in ("labeled", "unlabeled")
    }
    val = read_lines(os.path.join(demo_root, "splits", "val.txt"))
    assert len(val) == 8
    assert os.path.isfile(os.path.join(demo_root, ".complete"))

    classes_seen = set()
    for line in splits["labeled"] + splits["unlabeled"] + val:
        img_rel, mask_rel = line.split()
        assert img_rel.startswith("JPEGImages/") and mask_rel.startswith("SegmentationClass/")
        img = Image.open(os.path.join(demo_root, img_rel))
        mask = Image.open(os.path.join(demo_root, mask_rel))
        assert img.mode == "RGB" and img.size == (48, 48)
        assert mask.mode == "P" and mask.size == (48, 48)
        values = np.unique(np.array(mask))
        assert values.min() >= 0 and values.max() < len(DEMO_CLASSES)
        classes_seen |= set(values.tolist())
    assert classes_seen == set(range(len(DEMO_CLASSES)))


def class_colors(root):
    """Mean colour of each class in each image: {class: (n, 3)}."""
    colors = {c: [] for c in range(len(DEMO_CLASSES))}
    for line in read_lines(os.path.join(root, "splits", "unlabeled.txt")):
        img_rel, mask_rel = line.split()
        img = np.array(Image.open(os.path.join(root, img_rel)), dtype=np.float64)
        mask = np.array(Image.open(os.path.join(root, mask_rel)))
        for c in np.unique(mask):
            colors[c].append(img[mask == c].mean(axis=0))
    return {c: np.array(m) for c, m in colors.items()}


def test_demo_colour_does_not_give_the_shape_away(demo_root):
    colors = class_colors(demo_root)
    shape_means = []
    for c in range(1, len(DEMO_CLASSES)):
        assert len(colors[c]) >= 3, f"class {DEMO_CLASSES[c]} is too rare"
        assert colors[c].std(axis=0).min() > 25  # colours vary widely within a class
        shape_means.append(colors[c].mean(axis=0))
    shape_means = np.array(shape_means)
    # All shape classes share one colour distribution (up to sampling noise).
    assert np.abs(shape_means - shape_means.mean(axis=0)).max() < 35
    # With the default colour shift the background is darker on average.
    assert colors[0].mean() < shape_means.mean() - 30


def test_demo_without_colour_shift(tmp_path):
    generate_demo(str(tmp_path), **{**TINY, "num_train": 60}, color_shift=0)
    colors = class_colors(str(tmp_path))
    shapes = np.concatenate([colors[c] for c in range(1, len(DEMO_CLASSES))])
    assert abs(colors[0].mean() - shapes.mean()) < 20


def test_demo_split_partitions_train(demo_root):
    labeled = read_lines(os.path.join(demo_root, "splits", "labeled.txt"))
    unlabeled = read_lines(os.path.join(demo_root, "splits", "unlabeled.txt"))
    val = read_lines(os.path.join(demo_root, "splits", "val.txt"))
    assert len(labeled) == 4 and len(unlabeled) == 36
    assert not set(labeled) & set(unlabeled)
    train_ids = {line.split()[0] for line in labeled + unlabeled}
    assert train_ids == {f"JPEGImages/train_{i:05d}.jpg" for i in range(40)}
    assert not train_ids & {line.split()[0] for line in val}


def test_demo_loads_with_semi_dataset(demo_root):
    splits = os.path.join(demo_root, "splits")
    nclass = len(DEMO_CLASSES)
    labeled = SemiDataset(demo_root, "train_l", os.path.join(splits, "labeled.txt"), nclass, 32, nsample=36)
    unlabeled = SemiDataset(demo_root, "train_u", os.path.join(splits, "unlabeled.txt"), nclass, 32)
    val = SemiDataset(demo_root, "val", os.path.join(splits, "val.txt"), nclass)
    assert len(labeled) == 36 and len(unlabeled) == 36 and len(val) == 8
    assert labeled[0][0].shape == (3, 32, 32) and len(unlabeled[0]) == 6 and val[0][0].shape == (3, 48, 48)


@pytest.mark.parametrize("fraction, expected", [(0.0, 1), (0.02, 1), (0.5, 20), (1.0, 40)])
def test_demo_labeled_count(tmp_path, fraction, expected):
    generate_demo(str(tmp_path), num_train=40, num_val=1, size=16, labeled_fraction=fraction)
    assert len(read_lines(tmp_path / "splits" / "labeled.txt")) == expected
    assert len(read_lines(tmp_path / "splits" / "unlabeled.txt")) == 40 - expected


def test_demo_is_deterministic(tmp_path, demo_root):
    generate_demo(str(tmp_path / "again"), **TINY)
    assert dataset_bytes(demo_root) == dataset_bytes(tmp_path / "again")
    generate_demo(str(tmp_path / "other"), **TINY, seed=1)
    other = dataset_bytes(tmp_path / "other")
    assert other["JPEGImages/train_00000.jpg"] != dataset_bytes(demo_root)["JPEGImages/train_00000.jpg"]


def test_ensure_demo_marker(tmp_path):
    root = str(tmp_path / "demo")
    small = dict(num_train=6, num_val=2, size=16)
    assert ensure_demo(root, **small) is True
    first_image = os.path.join(root, "JPEGImages", "train_00000.jpg")
    mtime = os.stat(first_image).st_mtime_ns
    assert ensure_demo(root, **small) is False  # complete: nothing is written
    assert os.stat(first_image).st_mtime_ns == mtime

    # A half-written dataset (no marker) is generated again.
    os.remove(os.path.join(root, ".complete"))
    os.remove(first_image)
    assert ensure_demo(root, **small) is True
    assert os.path.isfile(first_image) and os.path.isfile(os.path.join(root, ".complete"))

    # Other parameters than the ones recorded in the marker: an error naming both, nothing overwritten.
    marker = open(os.path.join(root, ".complete")).read()
    with pytest.raises(ValueError, match=r"made with num_train=6; the config asks for num_train=8"):
        ensure_demo(root, **{**small, "num_train": 8})
    assert open(os.path.join(root, ".complete")).read() == marker
    assert len(read_lines(os.path.join(root, "splits", "unlabeled.txt"))) == 5
    # A marker from another version of the generator, with a parameter this one does not have: named.
    with open(os.path.join(root, ".complete"), "w") as f:
        f.write(json.dumps({**json.loads(marker), "lighting": 0.5}))
    with pytest.raises(ValueError, match=r"made with lighting=0.5; the config asks for lighting=\(none\)"):
        ensure_demo(root, **small)
    with pytest.raises(ValueError, match="no complete demo dataset"):
        ensure_demo(str(tmp_path / "absent"), generate=False, **small)
    assert not os.path.exists(tmp_path / "absent")


def test_demo_cli(tmp_path):
    args = [
        "--root",
        str(tmp_path),
        "--num-train",
        "5",
        "--num-val",
        "1",
        "--size",
        "16",
        "--shapes-per-image",
        "1",
        "1",
    ]
    demo.main(args)
    assert len(read_lines(tmp_path / "splits" / "unlabeled.txt")) == 4
    assert ensure_demo(str(tmp_path), num_train=5, num_val=1, size=16, shapes_per_image=(1, 1)) is False


def wait_until(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_two_generations_on_one_fresh_folder_never_mix_it(tmp_path):
    """Two first runs on one fresh data_root with other demo.num_train: the second waits for the first to
    finish, then stops naming both parameter sets; the folder holds the first one's dataset, whole."""
    root = tmp_path / "demo"
    command = [sys.executable, "-m", "dataset.demo", "--root", str(root), "--size", "16", "--num-val", "2"]

    def start(num_train):  # output to a file: a pipe could fill up and block it
        with open(tmp_path / f"{num_train}.log", "w") as log:
            return subprocess.Popen(
                [*command, "--num-train", str(num_train)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def log(num_train):
        return (tmp_path / f"{num_train}.log").read_text()

    first = start(300)
    try:
        wait_until(lambda: (root / "JPEGImages").is_dir() or first.poll() is not None, "the first generation")
        first.send_signal(signal.SIGSTOP)  # paused in the middle of writing the images
        assert first.poll() is None, log(300)
        second = start(200)
        wait_until(lambda: "waiting for" in log(200) or second.poll() is not None, "the second generation")
        assert second.poll() is None, f"the second generation did not wait for the first:\n{log(200)}"
        assert f"waiting for host {socket.gethostname()}, PID {first.pid}," in log(200)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=60) == 0, log(300)
    assert second.wait(timeout=60) != 0
    made = f"{root} holds a demo dataset made with num_train=300; the config asks for num_train=200"
    assert made in log(200)
    assert demo.read_marker(str(root))["num_train"] == 300
    assert len(os.listdir(root / "JPEGImages")) == 302
    train = read_lines(root / "splits" / "labeled.txt") + read_lines(root / "splits" / "unlabeled.txt")
    assert len(train) == 300


# ---------------------------------------------------------------------------
# make_splits: core


def train_lines(n):
    return [f"img/{i:04d}.jpg mask/{i:04d}.png" for i in range(n)]


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_split_partitions_train_and_respects_pool():
    train = train_lines(100)
    pool = train[10:40]
    labeled, unlabeled = make_splits.split_labeled(train, pool, num=12, seed=3)
    assert len(labeled) == 12 and len(unlabeled) == 88
    assert set(labeled) <= set(pool)
    assert set(labeled) | set(unlabeled) == set(train) and not set(labeled) & set(unlabeled)
    assert unlabeled == [line for line in train if line not in labeled]  # file order
    assert labeled == [line for line in train if line in labeled]


def test_split_is_deterministic_and_order_independent():
    train = train_lines(200)
    first = make_splits.split_labeled(train, num=20, seed=0)
    assert make_splits.split_labeled(train, num=20, seed=0) == first
    assert make_splits.split_labeled(train, num=20, seed=1) != first
    # The draw is made over the sorted pool: reordering the file does not change it.
    shuffled = train[::-1]
    labeled, _ = make_splits.split_labeled(shuffled, num=20, seed=0)
    assert sorted(labeled) == sorted(first[0])


@pytest.mark.parametrize(
    "fraction, total, expected",
    [("1_16", 10582, 662), ("1/8", 10582, 1323), ("1_2", 2975, 1488), ("1_512", 118287, 232),
     ("0.1", 1000, 100), (0.1, 1000, 100), ("1_16", 10, 1), ("1", 7, 7)],
)  # fmt: skip
def test_fraction_rounding(fraction, total, expected):
    assert make_splits.count_for_fraction(fraction, total) == expected


def test_fraction_split_counts():
    labeled, unlabeled = make_splits.split_labeled(train_lines(100), fraction="1_8")
    assert (len(labeled), len(unlabeled)) == (13, 87)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num=101), "cannot draw 101"),
        (dict(num=0), "cannot draw 0"),
        (dict(fraction="3/2"), r"fraction must be in \(0, 1\]"),
        (dict(num=5, fraction="1_2"), "exactly one"),
        (dict(pool=["not/in.jpg train.png"], num=1), "of pool are not in train list"),
        (dict(train=[], num=1), "empty"),
        (dict(train=train_lines(3) + train_lines(1), num=1), "more than once"),
    ],
)
def test_split_errors(kwargs, message):
    kwargs = {"train": train_lines(100), **kwargs}
    with pytest.raises(ValueError, match=message):
        make_splits.split_labeled(**kwargs)


def test_custom_cli_writes_identical_files(tmp_path):
    train = write(tmp_path / "train.txt", [""] + train_lines(50) + [""])
    pool = write(tmp_path / "pool.txt", train_lines(50)[:20])
    for out in ("a", "b"):
        make_splits.main(
            ["custom", "--train-list", train, "--pool", pool, "--num", "5", "--out", str(tmp_path / out)]
        )
    make_splits.main(
        ["custom", "--train-list", train, "--num", "5", "--seed", "1", "--out", str(tmp_path / "c")]
    )
    for name in ("labeled.txt", "unlabeled.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    labeled = read_lines(tmp_path / "a" / "labeled.txt")
    assert len(labeled) == 5 and set(labeled) <= set(train_lines(20))
    assert len(read_lines(tmp_path / "a" / "unlabeled.txt")) == 45
    assert (tmp_path / "a" / "labeled.txt").read_bytes() != (tmp_path / "c" / "labeled.txt").read_bytes()

    make_splits.main(["custom", "--train-list", train, "--fraction", "1_4", "--out", str(tmp_path / "d")])
    assert len(read_lines(tmp_path / "d" / "labeled.txt")) == 13


def test_custom_cli_errors_name_the_file(tmp_path, capsys):
    train = write(tmp_path / "train.txt", train_lines(10))
    bad_pool = write(tmp_path / "bad_pool.txt", ["elsewhere.jpg elsewhere.png"])
    empty = write(tmp_path / "empty.txt", [])
    cases = [
        (["--train-list", train, "--pool", bad_pool, "--num", "1"], "bad_pool.txt"),
        (["--train-list", empty, "--num", "1"], "empty.txt"),
        (["--train-list", str(tmp_path / "missing.txt"), "--num", "1"], "missing.txt"),
        (["--train-list", train, "--num", "11"], "train.txt"),
    ]
    for args, name in cases:
        with pytest.raises(SystemExit) as exit_info:
            make_splits.main(["custom", *args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 1
        assert name in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# make_splits: dataset presets on fake folder trees (empty files: only names matter)


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_pascal_preset(tmp_path):
    root = tmp_path / "VOC2012"
    ids = [f"2007_{i:06d}" for i in range(2100)]
    val_ids, classic_ids = ids[:100], ids[100:1564]
    for i in ids:
        touch(root / "SegmentationClass" / f"{i}.png")
    write(root / "ImageSets" / "Segmentation" / "val.txt", val_ids)
    write(root / "ImageSets" / "Segmentation" / "train.txt", classic_ids)

    out = tmp_path / "splits" / "pascal"
    make_splits.main(["pascal", "--data-root", str(root), "--out", str(out)])
    line = "JPEGImages/{0}.jpg SegmentationClass/{0}.png".format
    assert read_lines(out / "val.txt") == [line(i) for i in val_ids]
    train_aug = [line(i) for i in ids[100:]]
    for name in ("92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "1_2"):
        labeled = read_lines(out / name / "labeled.txt")
        unlabeled = read_lines(out / name / "unlabeled.txt")
        assert sorted(labeled + unlabeled) == sorted(train_aug) and not set(labeled) & set(unlabeled)
        if name.isdigit():
            assert len(labeled) == int(name) and set(labeled) <= {line(i) for i in classic_ids}
        else:
            assert len(labeled) == make_splits.count_for_fraction(name, 2000)
    assert len(read_lines(out / "1_16" / "labeled.txt")) == 125
    first = dataset_bytes(out)
    make_splits.main(["pascal", "--data-root", str(root), "--out", str(out)])
    assert dataset_bytes(out) == first


def test_pascal_preset_missing_val_mask(tmp_path, capsys):
    root = tmp_path / "VOC2012"
    touch(root / "SegmentationClass" / "a.png")
    write(root / "ImageSets" / "Segmentation" / "val.txt", ["b"])
    write(root / "ImageSets" / "Segmentation" / "train.txt", ["a"])
    with pytest.raises(SystemExit):
        make_splits.main(["pascal", "--data-root", str(root), "--out", str(tmp_path / "out")])
    assert "val.txt" in capsys.readouterr().err


def test_cityscapes_preset(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for city in cities:
            for k in range(20):
                name = f"{city}_{k:06d}_000019"
                touch(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                touch(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png")
    out = tmp_path / "splits"
    make_splits.main(["cityscapes", "--data-root", str(root), "--out", str(out)])
    val = read_lines(out / "val.txt")
    assert len(val) == 20
    assert val[0] == (
        "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png "
        "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    )
    for name, n in (("1_16", 3), ("1_8", 5), ("1_4", 10), ("1_2", 20)):
        assert len(read_lines(out / name / "labeled.txt")) == n
        assert len(read_lines(out / name / "unlabeled.txt")) == 40 - n

    os.remove(root / "gtFine" / "train" / "bochum" / "bochum_000003_000019_gtFine_labelTrainIds.png")
    with pytest.raises(SystemExit):
        make_splits.main(["cityscapes", "--data-root", str(root), "--out", str(out)])
    assert "bochum_000003_000019_gtFine_labelTrainIds.png" in capsys.readouterr().err


def test_coco_preset(tmp_path):
    root = tmp_path / "coco"
    for split, n in (("train2017", 600), ("val2017", 5)):
        for k in range(n):
            touch(root / split / f"{k:012d}.jpg")
            touch(root / "masks" / f"{k:012d}.png")  # UniMatch's layout: one masks/ folder
    out = tmp_path / "splits"
    make_splits.main(["coco", "--data-root", str(root), "--out", str(out)])
    assert read_lines(out / "val.txt")[0] == "val2017/000000000000.jpg masks/000000000000.png"
    for name, n in (("1_512", 2), ("1_256", 3), ("1_128", 5), ("1_64", 10), ("1_32", 19)):
        assert len(read_lines(out / name / "labeled.txt")) == n
        assert len(read_lines(out / name / "unlabeled.txt")) == 600 - n
