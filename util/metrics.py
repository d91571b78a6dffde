"""Segmentation metric (mIoU), test-time inference and the validation loop.

Conventions follow UniMatch so that numbers are comparable with the paper:
  * intersection and union are summed over the whole validation set, then IoU is taken per class;
  * mIoU is the plain mean over all `nclass` classes (a class absent from both prediction and
    ground truth counts as IoU 0);
  * sliding-window inference uses stride int(2/3 * crop) and cuts edge windows at the image border.
"""

import contextlib

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


def _forward_probs(model, x, flip):
    """Softmax of model(x) (B,K,h,w) in float32; with flip, plus the un-flipped softmax of model(flip(x))."""
    probs = model(x).float().softmax(dim=1)
    if flip:
        probs = probs + model(x.flip(3)).float().softmax(dim=1).flip(3)
    return probs


def window_starts(length, crop_size):
    """Start offsets of sliding windows along one axis: 0, stride, 2*stride, ... while start < length."""
    stride = int(crop_size * 2 / 3)
    if stride < 1:
        raise ValueError(f"crop_size {crop_size} is too small for sliding-window inference")
    return list(range(0, length, stride))


def _sliding_window_probs(model, img, nclass, crop_size, flip):
    """Sum of window softmaxes (B,K,H,W); window [start, min(start + crop, size)) along each axis.

    As in UniMatch, windows touching the bottom/right border are simply cut there (they can be smaller
    than the crop, no padding, not shifted back), so overlapping pixels are covered by 1, 2 or 4 windows.
    """
    b, _, h, w = img.shape
    probs = torch.zeros((b, nclass, h, w), dtype=torch.float32, device=img.device)
    for top in window_starts(h, crop_size):
        bottom = min(top + crop_size, h)
        for left in window_starts(w, crop_size):
            right = min(left + crop_size, w)
            window = img[:, :, top:bottom, left:right]
            probs[:, :, top:bottom, left:right] += _forward_probs(model, window, flip)
    return probs


def _single_scale_probs(model, img, nclass, mode, crop_size, flip):
    if mode == "sliding_window":
        return _sliding_window_probs(model, img, nclass, crop_size, flip)
    # 'original', and 'center_crop' whose cropping the caller has already done (see center_crop).
    return _forward_probs(model, img, flip)


def predict(model, img, nclass, mode="original", crop_size=None, flip=False, scales=(1.0,)):
    """Summed softmax probabilities (B,K,H,W) float32 for a normalized image batch img (B,3,H,W).

    mode: 'original' (one forward on the whole image), 'center_crop' (same as 'original': crop img and
    mask with center_crop before calling) or 'sliding_window' (crop_size windows, stride 2/3 crop).
    flip: also add the flipped-back softmax of the horizontally flipped input (per forward / window).
    scales: for each s != 1 the image is resized by s (bilinear, align_corners=True), run in `mode` at
    that size, and its probabilities are resized back to (H, W). Everything is summed; take argmax(1).
    """
    if mode not in MODES:
        raise ValueError(f"unknown eval mode {mode!r}, expected one of {MODES}")
    if mode == "sliding_window" and crop_size is None:
        raise ValueError("sliding_window inference needs crop_size")

    b, _, h, w = img.shape
    total = torch.zeros((b, nclass, h, w), dtype=torch.float32, device=img.device)
    for scale in scales:
        if scale == 1.0:
            total += _single_scale_probs(model, img, nclass, mode, crop_size, flip)
            continue
        size = (max(round(h * scale), 1), max(round(w * scale), 1))
        scaled = F.interpolate(img, size=size, mode="bilinear", align_corners=True)
        probs = _single_scale_probs(model, scaled, nclass, mode, crop_size, flip)
        total += F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)
    return total


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
