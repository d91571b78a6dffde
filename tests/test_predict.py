"""predict.py: masks and overlays for a folder or glob of new images, with eval.py's inference modes."""

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from dataset.classes import palette
from dataset.transforms import normalize
from model import build_model
from util import checkpoint as ckpt
from util.metrics import predict as reference_predict

CFG = {
    "dataset": "pascal", "nclass": 5, "backbone": "resnet18", "backbone_width": 8, "head_channels": 16,
    "dilations": [1, 2, 3], "crop_size": 24, "eval_mode": "original", "eval_scales": [1.0], "amp": "none",
}  # fmt: skip


# CFG as a training config file
CONFIG = (
    "dataset: pascal\ndata_root: .\nnclass: 5\ncrop_size: 24\nval_id_path: v.txt\nbackbone: resnet18\n"
    "backbone_width: 8\nhead_channels: 16\ndilations: [1, 2, 3]\nepochs: 1\nbatch_size: 1\nlr: 0.1\n"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A best.pth-like checkpoint of a small random model whose predictions vary across the image."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model(CFG)
    # BatchNorm statistics of real inputs: standardised features make the argmax vary over the image
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 48, 48))
    path = str(folder / "best.pth")
    ckpt.save_atomic({"model": model.state_dict(), "cfg": CFG, "iteration": 3, "miou": 1.0}, path)
    return path, model.eval()


def image_folder(root):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 41, 3), dtype=np.uint8)).save(root / "a.png")  # same stem
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(root / "gray.png")  # mode L
    (root / "notes.txt").write_text("not an image\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (20, 26, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")


def expected(model, path, mode="original", flip=False, scales=(1.0,)):
    image = Image.open(path).convert("RGB")
    with torch.no_grad():
        probs = reference_predict(model, normalize(image).unsqueeze(0), 5, mode, 24, flip, scales)
    return probs.argmax(1)[0].numpy(), image


@pytest.mark.parametrize(
    "options, kwargs",
    [([], {}), (["--mode", "sliding_window", "--flip", "--scales", "0.75", "1.0"],
                {"mode": "sliding_window", "flip": True, "scales": (0.75, 1.0)})],
)  # fmt: skip
def test_folder_of_mixed_images(tmp_path, capsys, trained, options, kwargs):
    path, model = trained
    images, out = tmp_path / "images", tmp_path / "out"
    image_folder(images)
    assert predict.main(["--checkpoint", path, "--images", str(images), "--out", str(out), *options]) == 3
    log = capsys.readouterr().out
    assert f"skipped {images / 'notes.txt'}" in log and f"skipped {images / 'broken.jpg'}" in log
    assert sorted(os.listdir(out)) == [
        "a.png", "a_overlay.png", "a_png.png", "a_png_overlay.png", "gray.png", "gray_overlay.png"
    ]  # fmt: skip
    seen = set()
    for name, source in (("a", "a.jpg"), ("a_png", "a.png"), ("gray", "gray.png")):
        pred, image = expected(model, images / source, **kwargs)
        mask = Image.open(out / f"{name}.png")
        assert mask.mode == "P" and mask.size == image.size
        assert np.array_equal(np.array(mask), pred)
        assert np.array(mask.getpalette()[:15]).reshape(5, 3).tolist() == palette("pascal", 5)[:5].tolist()
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png"), dtype=np.float64)
        blend = 0.5 * np.asarray(image, dtype=np.float64) + 0.5 * palette("pascal", 5)[pred]
        assert overlay.shape == blend.shape and np.abs(overlay - blend).max() <= 0.5  # rounding
        seen |= set(np.unique(pred).tolist())
    assert len(seen) > 1  # the comparison means something


def test_glob_keeps_folders(tmp_path, trained):
    path, _ = trained
    images, out = tmp_path / "images", tmp_path / "out"
    image_folder(images)
    pattern = str(images / "**" / "*.jpg")
    assert predict.main(["--checkpoint", path, "--images", pattern, "--out", str(out)]) == 2  # broken.jpg
    assert os.path.isfile(out / "a.png") and os.path.isfile(out / "sub" / "b.png")
    assert Image.open(out / "sub" / "b.png").size == (26, 20)


def test_bare_state_dict_needs_a_config(tmp_path, capsys, trained):
    _, model = trained
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    images = tmp_path / "images"
    image_folder(images)
    with pytest.raises(SystemExit) as info:
        predict.main(["--checkpoint", str(bare), "--images", str(images), "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and f"checkpoint {bare} holds no config" in capsys.readouterr().err

    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    args = ["--checkpoint", str(bare), "--config", str(config), "--images", str(images / "gray.png")]
    assert predict.main([*args, "--out", str(tmp_path / "o")]) == 1
    pred, _ = expected(model, images / "gray.png")
    assert np.array_equal(np.array(Image.open(tmp_path / "o" / "gray.png")), pred)


def test_nothing_to_predict(tmp_path, capsys, trained):
    path, _ = trained
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    for spec, message in ((tmp_path / "docs", "none of the files"), (tmp_path / "*.tif", "no file matches")):
        with pytest.raises(SystemExit) as info:
            predict.main(["--checkpoint", path, "--images", str(spec), "--out", str(tmp_path / "o")])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_pickled_checkpoint_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "cfg": CFG, "hook": sys.exit}, evil)
    with pytest.raises(SystemExit) as info:
        predict.main(["--checkpoint", str(evil), "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "pickled code" in capsys.readouterr().err


def test_a_config_of_another_architecture_is_named_and_the_model_built_as_saved(tmp_path, capsys, trained):
    path, model = trained
    images = tmp_path / "images"
    image_folder(images)
    config = tmp_path / "other.yaml"
    config.write_text(CONFIG.replace("dilations: [1, 2, 3]", "dilations: [2, 4, 6]\noutput_stride: 8"))
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", path, "--config", str(config), "--images", str(images / "a.jpg"),
                         "--out", str(out)]) == 1  # fmt: skip
    pred, _ = expected(model, images / "a.jpg")
    assert np.array_equal(np.array(Image.open(out / "a.png")), pred)
    assert (
        f"warning: {config} disagrees with the config saved in {path} on the architecture (saved -> given): "
        "output_stride: 16 -> 8, dilations: [1, 2, 3] -> [2, 4, 6]; the model is built as saved"
    ) in capsys.readouterr().out


def test_an_out_that_would_overwrite_inputs_is_refused(tmp_path, capsys, trained):
    path, _ = trained
    images = tmp_path / "images"
    image_folder(images)  # a.jpg's prediction would be a.png, one of the inputs
    (images / "sub" / "a.png").write_bytes((images / "a.png").read_bytes())
    before = {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    cases = [
        (images, images, f"--out {images} is the folder of the images ({os.path.realpath(images)})"),
        # a glob that matches sub/a.png, with --out sub: a.png's prediction would be sub/a.png
        (
            images / "**" / "*.png",
            images / "sub",
            f"would overwrite 1 of the input images: {images / 'sub' / 'a.png'}",
        ),
    ]
    for spec, out, message in cases:
        with pytest.raises(SystemExit) as info:
            predict.main(["--checkpoint", path, "--images", str(spec), "--out", str(out)])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file()} == before
