"""Score a checkpoint on a validation split, and optionally save coloured predictions.

    python eval.py --config configs/pascal.yaml --checkpoint runs/unimatch_366/best.pth
    python eval.py --config configs/cityscapes.yaml --checkpoint runs/x/latest.pth --mode sliding_window \
        --flip --scales 0.75 1.0 1.25 --save-vis runs/x/vis
    torchrun --nproc_per_node=4 eval.py ...      # each process scores a share of the images

Any checkpoint works: best.pth, latest.pth, or a bare model state dict. The config (override keys as in
training, e.g. `eval_mode=sliding_window`) gives the data and the inference settings. The model is built
from the config saved in the checkpoint (best.pth and latest.pth hold theirs), and where the config
disagrees with it on the architecture (backbone, nclass, output stride, dilations, widths), a warning names
the keys; a bare state dict is built from the config, and one of another architecture stops with the
names of the tensors that do not fit.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from dataset.classes import dataset_classes
from dataset.semi import SemiDataset
from model import build_model
from model.semseg.deeplabv3plus import use_channels_last
from util import checkpoint as ckpt
from util.config import ConfigError, load_config
from util.dist import cleanup, init_distributed
from util.engine import EXIT_BAD_INPUT, amp_dtype, prepare_demo_data
from util.metrics import ShardSampler, evaluate, format_iou_table
from util.visualise import side_by_side


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="best.pth, latest.pth or a model state dict")
    parser.add_argument("--val-id-path", help="split file to score (default: the config's val_id_path)")
    parser.add_argument(
        "--mode", choices=("original", "center_crop", "sliding_window"), help="default: config"
    )
    parser.add_argument("--flip", action="store_true", help="add horizontally flipped predictions")
    parser.add_argument(
        "--scales", type=positive_float, nargs="+", help="multi-scale inference, e.g. 0.75 1.0 1.25"
    )
    parser.add_argument("--save-vis", metavar="DIR", help="write image | ground truth | prediction PNGs here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. backbone=resnet50")
    return parser.parse_intermixed_args(argv)


class VisualisationWriter:
    """Saves, per image, the input, the coloured ground truth and the coloured prediction side by side."""

    def __init__(self, folder: str, colours: np.ndarray):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.colours = colours

    def __call__(self, img, mask, pred, ids):
        picture = side_by_side(img[0], mask[0], pred[0], self.colours)
        # The split's relative path, so that images of one name in different folders do not collide.
        parts = [
            p for p in os.path.normpath(os.path.splitext(ids[0])[0]).split(os.sep) if p not in ("", "..")
        ]
        path = os.path.join(self.folder, *parts) + ".png"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(picture).save(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.val_id_path:
        overrides.append(f"val_id_path={args.val_id_path}")
    dist_info = init_distributed()
    try:
        cfg = load_config(args.config, overrides)
        if dist_info.is_main:
            prepare_demo_data(cfg, generate=False)
        state = ckpt.load(args.checkpoint)
        cfg, changes = ckpt.trained_architecture(cfg, state)
        if changes and dist_info.is_main:
            print(ckpt.architecture_warning(args.config, args.checkpoint, changes))
        model = build_model({**cfg, "pretrained": None}).to(dist_info.device)
        if cfg["channels_last"]:
            use_channels_last(model, dist_info.device)
        ckpt.load_model_weights(model, ckpt.model_state(state), args.checkpoint)
        classes = dataset_classes(cfg)
        val = SemiDataset(
            cfg["data_root"], "val", cfg["val_id_path"], nclass=cfg["nclass"],
            allow_outside_root=cfg["allow_outside_data_root"],
        )  # fmt: skip
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        cleanup()
        sys.exit(EXIT_BAD_INPUT)

    loader = torch.utils.data.DataLoader(val, batch_size=1, sampler=ShardSampler(val), num_workers=2)
    mode = args.mode or cfg["eval_mode"]
    scales = tuple(args.scales or cfg["eval_scales"])
    on_prediction = None
    if args.save_vis:
        on_prediction = VisualisationWriter(args.save_vis, classes.palette)
    flip = args.flip or cfg["eval_flip"]
    autocast = amp_dtype(cfg["amp"], dist_info.device)
    result = evaluate(
        model, loader, cfg["nclass"], mode=mode, crop_size=cfg["crop_size"], flip=flip, scales=scales,
        device=dist_info.device, amp_dtype=autocast, on_prediction=on_prediction,
    )  # fmt: skip
    if dist_info.is_main:
        where = f" (iteration {state['iteration']})" if "iteration" in state else ""
        if "network" in state:
            where += f", network '{state['network']}'"
        if "method_name" in state:
            where += f", written by {state['method_name']}, code {state.get('code_version', 'unknown')}"
        print(f"{args.checkpoint}{where} on {cfg['val_id_path']}: {len(val)} images, mode {mode}, "
              f"flip {flip}, scales {list(scales)}")  # fmt: skip
        print(format_iou_table(result["iou"], classes.names))
        if args.save_vis:
            print(f"predictions saved to {args.save_vis}")
    cleanup()
    return result


if __name__ == "__main__":
    main()
