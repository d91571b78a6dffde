"""Segmentation metric (mIoU), test-time inference and the validation loop.

Conventions follow UniMatch so that numbers are comparable with the paper:
  * intersection and union are summed over the whole validation set, then IoU is taken per class;
  * mIoU is the plain mean over all `nclass` classes (a class absent from both prediction and
    ground truth counts as IoU 0);
  * sliding-window inference uses stride int(2/3 * crop) and cuts edge windows at the image border.
"""

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Sampler

MODES = ("original", "center_crop", "sliding_window")


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


def intersection_and_union(pred, target, nclass, ignore_index=255):
    """Per-class pixel counts for one prediction; any shape, pred and target of the same shape.

    Pixels whose target is `ignore_index` are excluded. Target values outside [0, nclass) are excluded
    too (as UniMatch's histogram does), so a stray label cannot make the counts longer than nclass.

    Returns (intersection, union, target_area), each a LongTensor (nclass,) on pred's device.
    """
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < nclass)
    pred, target = pred[keep], target[keep]

    intersection = torch.bincount(target[pred == target], minlength=nclass)
    pred_area = torch.bincount(pred, minlength=nclass)
    target_area = torch.bincount(target, minlength=nclass)
    union = pred_area + target_area - intersection
    return intersection, union, target_area


def miou_from(intersection, union):
    """(mIoU, [IoU_c]) in percent from intersection and union counts (nclass,)."""
    iou = 100.0 * intersection.double() / (union.double() + 1e-10)
    return iou.mean().item(), iou.tolist()


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


def center_crop(img, mask, size):
    """Crop img (..., H, W) and mask (..., H, W) to their central size x size region.

    A side shorter than `size` is kept whole (no padding).
    """
    h, w = img.shape[-2:]
    top = max((h - size) // 2, 0)
    left = max((w - size) // 2, 0)
    img = img[..., top : top + size, left : left + size]
    mask = mask[..., top : top + size, left : left + size]
    return img, mask


def window_starts(length, crop_size):
    """Start offsets of sliding windows along one axis: 0, stride, 2*stride, ... while start < length."""
    stride = int(crop_size * 2 / 3)
    if stride < 1:
        raise ValueError(f"crop_size {crop_size} is too small for sliding-window inference")
    return list(range(0, length, stride))


def regions(h, w, mode, crop_size):
    """The (top, bottom, left, right) regions of an h x w image that the forward passes see.

    'sliding_window': windows [start, min(start + crop, size)) along each axis. As in UniMatch, windows
    touching the bottom/right border are simply cut there (they can be smaller than the crop, no padding,
    not shifted back), so overlapping pixels are covered by 1, 2 or 4 windows. Other modes: the whole
    image ('center_crop' is cropped by the caller, see center_crop).
    """
    if mode != "sliding_window":
        return [(0, h, 0, w)]
    return [
        (top, min(top + crop_size, h), left, min(left + crop_size, w))
        for top in window_starts(h, crop_size)
        for left in window_starts(w, crop_size)
    ]


def batched_softmax(model, inputs, flip, max_batch):
    """Softmax (float32) of the model on each input (B, 3, h, w) of one size, plus the flipped-back
    softmax of its horizontal flip with `flip`; the inputs (and their flips) go through the model
    together, at most `max_batch` images per forward. Returns one (B, K, h, w) map per input."""
    x = torch.cat(inputs)
    if flip:
        x = torch.cat([x, x.flip(3)])
    probs = torch.cat([model(chunk).float().softmax(dim=1) for chunk in x.split(max_batch)])
    if flip:
        probs, flipped = probs.chunk(2)
        probs = probs + flipped.flip(3)
    return probs.split(inputs[0].shape[0])


def predict(model, img, nclass, mode="original", crop_size=None, flip=False, scales=(1.0,), max_batch=8):
    """Summed softmax probabilities (B,K,H,W) float32 for a normalized image batch img (B,3,H,W).

    mode: 'original' (one forward on the whole image), 'center_crop' (same as 'original': crop img and
    mask with center_crop before calling) or 'sliding_window' (crop_size windows, stride 2/3 crop).
    flip: also add the flipped-back softmax of the horizontally flipped input (per forward / window).
    scales: for each s != 1 the image is resized by s (bilinear, align_corners=True), run in `mode` at
    that size, and its probabilities are resized back to (H, W). Everything is summed; take argmax(1).
    Windows (and flips) of the same size, over all scales, are batched: at most `max_batch` images per
    forward, in eval mode the same result as one forward per window.
    """
    if mode not in MODES:
        raise ValueError(f"unknown eval mode {mode!r}, expected one of {MODES}")
    if mode == "sliding_window" and crop_size is None:
        raise ValueError("sliding_window inference needs crop_size")

    b, _, h, w = img.shape
    sizes = [(max(round(h * scale), 1), max(round(w * scale), 1)) for scale in scales]
    scaled = [img if scale == 1.0 else resize(img, size) for scale, size in zip(scales, sizes)]
    # Every forward input over all scales, grouped by size: one batched forward per size.
    by_size = defaultdict(list)  # (height, width) -> [(scale index, (top, bottom, left, right))]
    for i, image in enumerate(scaled):
        for top, bottom, left, right in regions(*image.shape[-2:], mode, crop_size):
            by_size[bottom - top, right - left].append((i, (top, bottom, left, right)))
    sums = [img.new_zeros((b, nclass, *size), dtype=torch.float32) for size in sizes]
    for pieces in by_size.values():
        crops = [scaled[i][..., top:bottom, left:right] for i, (top, bottom, left, right) in pieces]
        probs = batched_softmax(model, crops, flip, max_batch)
        for (i, (top, bottom, left, right)), window_probs in zip(pieces, probs):
            sums[i][..., top:bottom, left:right] += window_probs

    total = img.new_zeros((b, nclass, h, w), dtype=torch.float32)
    for scale, probs in zip(scales, sums):
        total += probs if scale == 1.0 else resize(probs, (h, w))
    return total


def resize(x, size):
    """Bilinear, align_corners=True: the convention of every resize in the model."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------------
# Evaluation loop
# ----------------------------------------------------------------------------------------------


def _dist_ready():
    return dist.is_available() and dist.is_initialized()


class ShardSampler(Sampler):
    """Rank r gets indices r, r + world, r + 2*world, ...: disjoint shares, no padding, no shuffling.

    Unlike DistributedSampler, nothing is repeated to even out the shards, so every validation image is
    counted exactly once after the all_reduce in `evaluate` (ranks may get one image more or less).
    """

    def __init__(self, dataset, rank=None, world_size=None):
        if rank is None:
            rank = dist.get_rank() if _dist_ready() else 0
        if world_size is None:
            world_size = dist.get_world_size() if _dist_ready() else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _model_device(model):
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(
    model,
    loader,
    nclass,
    mode="original",
    crop_size=None,
    flip=False,
    scales=(1.0,),
    device=None,
    amp_dtype=None,
    on_prediction=None,
):
    """mIoU of `model` over `loader`, which yields (img (1,3,H,W), mask (1,H,W), id).

    Puts the model in eval mode and leaves it there (the caller switches back to train()).
    Under torch.distributed, each rank should see a disjoint shard (ShardSampler); the counts are summed
    across ranks, so every rank returns the same result.

    `on_prediction(img, mask, pred, ids)`, if given, sees every prediction (e.g. to save pictures).

    Returns {'miou': float, 'iou': [float] * nclass, 'intersection': LongTensor, 'union': LongTensor},
    the tensors on the CPU.
    """
    if mode == "center_crop" and crop_size is None:
        raise ValueError("center_crop evaluation needs crop_size")
    device = torch.device(device) if device is not None else _model_device(model)
    model.eval()

    intersection = torch.zeros(nclass, dtype=torch.long, device=device)
    union = torch.zeros(nclass, dtype=torch.long, device=device)
    with torch.no_grad():
        for img, mask, ids in loader:
            img = img.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            if mode == "center_crop":
                img, mask = center_crop(img, mask, crop_size)

            # Autocast only changes the forward passes; predict accumulates probabilities in float32.
            amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with amp:
                probs = predict(model, img, nclass, mode, crop_size, flip, scales)
            pred = probs.argmax(dim=1)  # (1, H, W)
            if on_prediction is not None:
                on_prediction(img, mask, pred, ids)

            inter, uni, _ = intersection_and_union(pred, mask, nclass)
            intersection += inter
            union += uni

    if _dist_ready():
        dist.all_reduce(intersection)
        dist.all_reduce(union)

    miou, iou = miou_from(intersection, union)
    return {"miou": miou, "iou": iou, "intersection": intersection.cpu(), "union": union.cpu()}


def format_iou_table(iou, names):
    """Aligned two-column text table: one line per class with its IoU (%), then the mIoU line."""
    if len(iou) != len(names):
        raise ValueError(f"{len(iou)} IoU values for {len(names)} class names")
    width = max([len("mIoU"), len("class")] + [len(n) for n in names])
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    lines += [f"{name:<{width}}  {value:6.2f}" for name, value in zip(names, iou, strict=True)]
    miou = sum(iou) / len(iou) if len(iou) else 0.0
    lines.append(f"{'mIoU':<{width}}  {miou:6.2f}")
    return "\n".join(lines)
