"""CamVid: the SegNet release converted into the project's layout, seeded labeled draws, the shipped
partitions and configs/camvid.yaml."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from dataset.camvid import convert_camvid
from dataset.classes import CAMVID_CLASSES, dataset_classes, read_classes_file
from dataset.semi import SemiDataset
from tools import make_splits
from util.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(ROOT, "splits", "camvid")
NAMES = {"train": ["b_01", "a_02", "a_01", "c_00"], "val": ["v_00", "v_01"], "test": ["t_00"]}
WIDTH, HEIGHT = 16, 12


def annotation(k):
    """(12, 16) ids in uniform 2x2 blocks: (6, 8) blocks cycling through 0..11 (11 = void), shifted by k."""
    blocks = ((np.arange(6 * 8) + k) % 12).reshape(6, 8)
    return np.kron(blocks, np.ones((2, 2), dtype=np.int64)).astype(np.uint8)


def edge_image(k):
    """(12, 16, 3): black left half, a colour of its own on the right."""
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[:, WIDTH // 2 :] = (200, 10 * k, 255)
    return image


def make_release(root):
    """A tiny SegNet layout: train/, trainannot/, val/, valannot/, test/, testannot/."""
    k = 0
    for split, names in NAMES.items():
        for folder in (split, split + "annot"):
            (root / folder).mkdir(parents=True)
        for name in names:
            Image.fromarray(edge_image(k)).save(root / split / f"{name}.png")
            Image.fromarray(annotation(k)).save(root / f"{split}annot" / f"{name}.png")
            k += 1
    return root


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def pixels(path):
    return np.asarray(Image.open(path))


def snapshot(folder):
    """Every file under ``folder``: relative path -> bytes."""
    return {
        os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(folder)
        for n in names
    }


def line(name):
    return f"JPEGImages/{name}.png SegmentationClass/{name}.png"


# ---------------------------------------------------------------------------------------------------
# conversion


def test_convert_at_half_size(tmp_path):
    source, data = make_release(tmp_path / "CamVid"), tmp_path / "camvid"
    done = convert_camvid(str(source), str(data), size=(8, 6))
    assert done.counts == (("train", 4), ("val", 2), ("test", 1))
    assert done.sizes == ((8, 6),) and (done.converted, done.unchanged) == (7, 0)

    for k, name in enumerate(NAMES["train"] + NAMES["val"] + NAMES["test"]):
        image = Image.open(data / "JPEGImages" / f"{name}.png")
        mask = Image.open(data / "SegmentationClass" / f"{name}.png")
        assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (8, 6), "L", (8, 6))
        # Uniform 2x2 blocks: nearest gives one id per block; void 11 becomes 255.
        expected = ((np.arange(48) + k) % 12).reshape(6, 8)
        assert (pixels(mask.filename) == np.where(expected == 11, 255, expected)).all()
        # Bilinear: the black | colour edge blends into the two columns beside it; far from it, the colours.
        rgb = pixels(image.filename).astype(int)
        assert (rgb[:, 0] == 0).all() and (rgb[:, -1] == (200, 10 * k, 255)).all()
        assert 0 < rgb[0, 3, 0] < 100 and 100 < rgb[0, 4, 0] < 200

    assert read_lines(data / "train.txt") == [line(n) for n in ("a_01", "a_02", "b_01", "c_00")]
    assert read_lines(data / "val.txt") == [line("v_00"), line("v_01")]
    assert read_lines(data / "test.txt") == [line("t_00")]

    assert read_lines(data / "classes.txt")[:2] == ["sky 128 128 128", "building 128 0 0"]
    assert read_lines(data / "classes.txt")[-1] == "bicyclist 0 128 192"
    from_file = read_classes_file(str(data / "classes.txt"), 11)
    built_in = dataset_classes({"dataset": "camvid", "nclass": 11, "data_root": str(tmp_path)})
    assert from_file.names == built_in.names == CAMVID_CLASSES
    assert (from_file.palette[:11] == built_in.palette[:11]).all()
    assert from_file.palette[4].tolist() == [60, 40, 222] and from_file.palette[255].tolist() == [255] * 3

    val = SemiDataset(str(data), "val", str(data / "val.txt"), nclass=11)
    image, mask, _ = val[0]
    assert tuple(image.shape) == (3, 6, 8) and set(mask.unique().tolist()) == set(range(11)) | {255}


def test_scale_and_full_size(tmp_path):
    source = make_release(tmp_path / "CamVid")
    convert_camvid(str(source), str(tmp_path / "half"), scale=0.5)
    convert_camvid(str(source), str(tmp_path / "sized"), size=(8, 6))
    assert snapshot(tmp_path / "half") == snapshot(tmp_path / "sized")

    done = convert_camvid(str(source), str(tmp_path / "full"))  # no resize: the ids, void -> 255
    assert done.sizes == ((WIDTH, HEIGHT),)
    mask = pixels(tmp_path / "full" / "SegmentationClass" / "v_00.png")
    assert (mask == np.where(annotation(4) == 11, 255, annotation(4))).all()
    assert (pixels(tmp_path / "full" / "JPEGImages" / "v_00.png") == edge_image(4)).all()


def test_rerun_keeps_files_and_refuses_other_content(tmp_path):
    source, data = make_release(tmp_path / "CamVid"), tmp_path / "camvid"
    convert_camvid(str(source), str(data), size=(8, 6))
    before = snapshot(data)
    mtime = os.stat(data / "JPEGImages" / "a_01.png").st_mtime_ns

    done = convert_camvid(str(source), str(data), size=(8, 6))
    assert (done.converted, done.unchanged) == (0, 7)
    assert os.stat(data / "JPEGImages" / "a_01.png").st_mtime_ns == mtime and snapshot(data) == before

    # A missing output is written again, the rest is left as it is.
    os.remove(data / "SegmentationClass" / "c_00.png")
    assert convert_camvid(str(source), str(data), size=(8, 6)).converted == 1
    assert snapshot(data) == before

    with pytest.raises(FileExistsError, match=r"14 file\(s\) in .*camvid differ .*JPEGImages/a_01\.png"):
        convert_camvid(str(source), str(data), size=(4, 3))
    assert snapshot(data) == before  # nothing written

    convert_camvid(str(source), str(data), size=(4, 3), overwrite=True)
    assert Image.open(data / "JPEGImages" / "a_01.png").size == (4, 3)
    assert snapshot(data)["train.txt"] == before["train.txt"]


def break_annotation(source):
    os.remove(source / "valannot" / "v_01.png")
    return "have no annotation", source / "val" / "v_01.png"


def bad_value(source):
    ids = annotation(0)
    ids[3, 5] = 12
    Image.fromarray(ids).save(source / "testannot" / "t_00.png")
    return r"holds class ids \[12\] outside 0..11", source / "testannot" / "t_00.png"


def missing_folder(source):
    os.rename(source / "testannot", source / "test_annot")
    return "CamVid folder not found", source / "testannot"


def other_size(source):
    Image.fromarray(annotation(0)[:, :14]).save(source / "trainannot" / "a_02.png")
    return "is 14x12 but its image", source / "trainannot" / "a_02.png"


def rgb_annotation(source):
    Image.fromarray(edge_image(0)).save(source / "trainannot" / "b_01.png")
    return "one channel", source / "trainannot" / "b_01.png"


@pytest.mark.parametrize("spoil", [break_annotation, bad_value, missing_folder, other_size, rgb_annotation])
def test_bad_release_stops_naming_the_file_and_writes_nothing(tmp_path, spoil):
    source, data = make_release(tmp_path / "CamVid"), tmp_path / "camvid"
    message, path = spoil(source)
    with pytest.raises((FileNotFoundError, ValueError), match=message) as info:
        convert_camvid(str(source), str(data), scale=0.5)
    assert str(path) in str(info.value)
    assert not data.exists()


def test_command_line(tmp_path, capsys):
    source, data = make_release(tmp_path / "CamVid"), tmp_path / "camvid"
    make_splits.main(["camvid", "--source", str(source), "--data-root", str(data), "--size", "8x6"])
    assert f"{data}: 4 train, 2 val, 1 test images at 8x6 (7 written" in capsys.readouterr().out
    bad_value(source)
    with pytest.raises(SystemExit):
        make_splits.main(["camvid", "--source", str(source), "--data-root", str(tmp_path / "x")])
    assert "t_00.png holds class ids [12]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_splits.main(["camvid", "--data-root", str(data), "--scale", "0.5"])
    assert "give --source" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# seeded labeled draws


def fake_converted(root, num_train=40, num_val=5):
    root.mkdir()
    (root / "train.txt").write_text("".join(line(f"tr_{i:02d}") + "\n" for i in range(num_train)))
    (root / "val.txt").write_text("".join(line(f"va_{i:02d}") + "\n" for i in range(num_val)))
    return read_lines(root / "train.txt")


def test_draws_are_seeded_partitions(tmp_path):
    train = fake_converted(tmp_path / "camvid")
    draws = make_splits.camvid_draws(str(tmp_path / "camvid"), (12, 23), seed=0)
    assert draws == make_splits.camvid_draws(str(tmp_path / "camvid"), (12, 23), seed=0)
    assert (
        draws["12/labeled.txt"]
        != make_splits.camvid_draws(str(tmp_path / "camvid"), (12,), 1)["12/labeled.txt"]
    )
    assert draws["train.txt"] == train and len(draws["val.txt"]) == 5
    for num in (12, 23):
        labeled, unlabeled = draws[f"{num}/labeled.txt"], draws[f"{num}/unlabeled.txt"]
        assert len(labeled) == len(set(labeled)) == num and not set(labeled) & set(unlabeled)
        assert sorted(labeled + unlabeled) == sorted(train)
        assert unlabeled == [x for x in train if x not in labeled]  # training-list order


def test_draws_command_writes_and_protects(tmp_path):
    data, out = tmp_path / "camvid", tmp_path / "draws"
    fake_converted(data, num_train=100)
    args = ["camvid", "--data-root", str(data), "--out", str(out)]
    make_splits.main([*args, "--labeled", "3", "7", "--seed", "2"])
    assert sorted(os.listdir(out)) == ["3", "7", "train.txt", "val.txt"]
    assert len(read_lines(out / "7" / "labeled.txt")) == 7
    first = snapshot(out)
    make_splits.main([*args, "--labeled", "3", "7", "--seed", "2"])  # the same draw again: fine
    assert snapshot(out) == first

    with pytest.raises(SystemExit):  # another seed would replace the partitions
        make_splits.main([*args, "--labeled", "3", "7", "--seed", "3"])
    assert snapshot(out) == first
    make_splits.main([*args, "--labeled", "3", "7", "--seed", "3", "--overwrite"])
    assert snapshot(out)["3/labeled.txt"] != first["3/labeled.txt"]

    make_splits.main(["camvid", "--data-root", str(data), "--out", str(tmp_path / "default")])
    assert sorted(os.listdir(tmp_path / "default"))[:4] == ["12", "23", "46", "92"]


def test_draws_need_a_converted_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_splits.main(["camvid", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "d")])
    assert "none/train.txt not found: convert CamVid" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------
# the shipped partitions and the config


def shipped(*parts):
    return read_lines(os.path.join(SPLITS, *parts))


def test_config_loads_and_names_shipped_splits():
    cfg = load_config(os.path.join(ROOT, "configs", "camvid.yaml"))
    assert (cfg["dataset"], cfg["nclass"], cfg["data_root"]) == ("camvid", 11, "data/camvid")
    assert len(CAMVID_CLASSES) == cfg["nclass"]
    for key in ("labeled_id_path", "unlabeled_id_path", "val_id_path"):
        assert os.path.isfile(os.path.join(ROOT, cfg[key])), key


@pytest.mark.parametrize("num", [12, 23, 46, 92])
def test_shipped_partitions(num):
    train = shipped("all.txt")
    labeled, unlabeled = shipped(str(num), "labeled.txt"), shipped(str(num), "unlabeled.txt")
    assert len(labeled) == len(set(labeled)) == num and len(unlabeled) == len(set(unlabeled))
    assert not set(labeled) & set(unlabeled) and set(labeled) | set(unlabeled) == set(train)


def test_shipped_lists():
    train, val = shipped("all.txt"), shipped("val.txt")
    assert len(train) == len(set(train)) == 367 and len(val) == len(set(val)) == 101
    assert not set(train) & set(val)
    layout = re.compile(r"JPEGImages/(\w+)\.png SegmentationClass/\1\.png")
    assert all(layout.fullmatch(x) for x in train + val)
    assert sorted(e.name for e in os.scandir(SPLITS) if e.is_dir()) == ["12", "23", "46", "92"]
