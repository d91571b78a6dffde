"""Segment new images with a trained checkpoint: a colour mask and an overlay per image, no masks needed.

    python predict.py --checkpoint runs/unimatch_366/best.pth --images photos/ --out runs/unimatch_366/pred
    python predict.py --checkpoint runs/x/best.pth --images 'data/new/**/*.jpg' --out pred \\
        --mode sliding_window --flip --scales 0.75 1.0 1.25

`--images` is a folder (its image files), a glob pattern (quoted; `**` recurses) or one file. For every
image, `OUT/<name>.png` holds the predicted class indices as a paletted PNG (it shows in the dataset's
colours and reads back as indices with `np.array(Image.open(...))`), and `OUT/<name>_overlay.png` the
image with the colours blended over it. A glob keeps the folder structure below the matches' common
folder. Files that are not images are skipped with a warning naming them.

The model is built from the config saved in the checkpoint (best.pth and latest.pth hold it); a bare
state dict needs `--config`. With both, `--config` gives the classes and the inference settings, and a
warning names the architecture keys on which it disagrees with the checkpoint's. Inference is eval.py's:
whole image or sliding window, flip, scales. Class colours come from dataset/classes.py (built in, or a
classes file for your own data). An --out that would overwrite an input (the images' own folder, or an
output that is one of the input files) is refused.
"""

import argparse
import contextlib
import glob
import os
import sys

import numpy as np
import torch
from PIL import Image

from dataset.classes import dataset_classes
from dataset.semi import DataError, load_image
from dataset.transforms import normalize
from model import build_model
from model.semseg.deeplabv3plus import use_channels_last
from util import checkpoint as ckpt
from util.config import ConfigError, load_config
from util.engine import amp_dtype as autocast_dtype
from util.metrics import predict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="best.pth, latest.pth or a model state dict")
    parser.add_argument("--images", required=True, help="a folder, a quoted glob pattern or one file")
    parser.add_argument("--out", required=True, help="folder for the masks and overlays")
    parser.add_argument(
        "--config",
        help="the training config: builds the model of a bare state dict; with a checkpoint that holds its "
        "config, gives the classes and inference settings only",
    )
    parser.add_argument("--mode", choices=("original", "sliding_window"), help="default: the config's")
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped predictions")
    parser.add_argument("--scales", type=float, nargs="+", help="multi-scale inference, e.g. 0.75 1.0 1.25")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in the overlay")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    return parser.parse_args(argv)


def find_images(spec: str) -> tuple[list[str], str]:
    """(files, base): the files `spec` names, sorted, and the folder their output names are relative to."""
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, n) for n in os.listdir(spec))
        return [f for f in files if os.path.isfile(f)], spec
    if os.path.isfile(spec):
        return [spec], os.path.dirname(spec)
    files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"--images {spec}: no such folder or file, and no file matches it")
    return files, os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])


def output_stem(path: str, base: str, taken: set) -> str:
    """`<folders below base>/<name>`; `a.jpg` and `a.png` in one folder become `a` and `a_png`."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    stem, ext = os.path.splitext(relative)
    if stem in taken:
        stem = f"{stem}_{ext.lstrip('.')}"
    taken.add(stem)
    return stem


def plan_outputs(files: list[str], base: str, out: str) -> list[tuple[str, str]]:
    """(input file, output stem) for every file: its prediction goes to <stem>.png and <stem>_overlay.png."""
    taken = set()
    return [(path, os.path.join(out, output_stem(path, base, taken))) for path in files]


def check_outputs(plan: list[tuple[str, str]], base: str, out: str) -> None:
    """Refuse an --out that would overwrite an input: the images' own folder, or an output path that is one
    of the input files (a glob that also matches files under --out)."""
    folder = os.path.realpath(base)
    if os.path.realpath(out) == folder:
        raise ValueError(
            f"--out {out} is the folder of the images ({folder}): the predictions would overwrite or mix "
            "with them; choose another folder"
        )
    inputs = {os.path.realpath(path) for path, _ in plan}
    outputs = [name for _, stem in plan for name in (stem + ".png", stem + "_overlay.png")]
    overwritten = [name for name in outputs if os.path.realpath(name) in inputs]
    if overwritten:
        raise ValueError(
            f"--out {out} would overwrite {len(overwritten)} of the input images: "
            + ", ".join(overwritten[:5])
            + ("..." if len(overwritten) > 5 else "")
            + "; choose another folder"
        )


def load_model(args, device):
    state = ckpt.load(args.checkpoint)
    if args.config:
        cfg = load_config(args.config)
    elif isinstance(state.get("cfg"), dict):
        cfg = state["cfg"]
    else:
        raise ConfigError(
            f"checkpoint {args.checkpoint} holds no config (a bare state dict?): pass the training --config"
        )
    cfg, changes = ckpt.trained_architecture(cfg, state)
    if changes:
        print(ckpt.architecture_warning(args.config, args.checkpoint, changes))
    missing = [k for k in ("dataset", "nclass", "backbone") if k not in cfg]
    if missing:
        raise ConfigError(f"the config of {args.checkpoint} lacks {', '.join(missing)}")
    model = build_model({**cfg, "pretrained": None})
    ckpt.load_model_weights(model, ckpt.model_state(state), args.checkpoint)
    model = model.to(device).eval()
    if cfg.get("channels_last"):
        use_channels_last(model, device)
    return model, cfg


def save_prediction(image: Image.Image, pred: np.ndarray, colours: np.ndarray, stem: str, alpha: float):
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    mask = Image.fromarray(pred.astype(np.uint8))
    mask.putpalette(colours.flatten().tolist())  # 'L' becomes 'P', keeping the indices
    mask.save(stem + ".png")
    Image.blend(image, Image.fromarray(colours[pred]), alpha).save(stem + "_overlay.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        files, base = find_images(args.images)
        plan = plan_outputs(files, base, args.out)
        check_outputs(plan, base, args.out)
        model, cfg = load_model(args, device)
        classes = dataset_classes(cfg)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    mode = args.mode or ("sliding_window" if cfg.get("eval_mode") == "sliding_window" else "original")
    scales = tuple(args.scales or cfg.get("eval_scales", [1.0]))
    flip = args.flip or cfg.get("eval_flip", False)
    # autocast as in training on a GPU; on a CPU it would only be slower
    amp_dtype = autocast_dtype(cfg.get("amp", "none"), device) if device.type == "cuda" else None
    print(f"{args.checkpoint}: {len(files)} file(s), mode {mode}, flip {flip}, scales {list(scales)}")

    done = 0
    for path, stem in plan:
        try:
            image = load_image(path)
        except DataError as err:
            print(f"warning: skipped {path}: not an image that can be read ({err.__cause__ or err})")
            continue
        img = normalize(image).unsqueeze(0).to(device)  # (1, 3, H, W)
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with torch.no_grad(), amp:
            probs = predict(model, img, cfg["nclass"], mode, cfg.get("crop_size"), flip, scales)
        pred = probs.argmax(dim=1)[0].cpu().numpy()  # (H, W)
        save_prediction(image, pred, classes.palette, stem, args.alpha)
        done += 1
    print(
        f"{done} prediction(s) in {args.out}"
        + (f", {len(files) - done} file(s) skipped" if done < len(files) else "")
    )
    if done == 0:
        print(f"error: none of the files of --images {args.images} is an image", file=sys.stderr)
        sys.exit(2)
    return done


if __name__ == "__main__":
    main()
