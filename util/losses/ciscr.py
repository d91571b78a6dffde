"""CISC-R's building blocks (Wu et al., TPAMI 2023) as plain functions of tensors.

A labeled image x_q with a region m_q (its pixels of a class it shares with an image x_u) gives a class
prototype: the masked average of its decoder feature. The cosine similarity of that prototype with every
pixel of x_u, upsampled to the crop, is the CISC map S(x_u | x_q, m_q). It trains the features (a BCE
against x_u's own region m_u, on labeled pairs) and rectifies pseudo-labels (pixel weight 1 - |m_u - S|).

Shapes: feature (B, C, h, w), non-negative (after the decoder's ReLU), so cosines lie in [0, 1];
masks and labels (B, H, W) at the crop's resolution; prototypes (B, C) or (K, C). Every resize is bilinear
with align_corners=True, as in the model.
"""

import torch
import torch.nn.functional as F

from util.losses import COS_EPS, IGNORE

AREA_EPS = 5e-4  # guards the masked average's denominator (an empty mask gives a zero prototype)
LOG_MIN = -100.0  # BCE's log is clamped here, as torch's binary_cross_entropy does


def interpolation_matrix(out_size: int, in_size: int, device=None) -> torch.Tensor:
    """(out_size, in_size): the weights of 1-D linear interpolation with align_corners=True, so that
    resizing a (..., in_size) signal is `signal @ matrix.T`. Bilinear resizing is one per axis."""
    eye = torch.eye(in_size, device=device).unsqueeze(0)  # (1, in, in): channel i is the i-th unit signal
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=True)[0].T


def pull_back(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A full-resolution mask (..., H, W) taken to the feature grid `size` (h, w) through the transpose of
    bilinear upsampling: sum_p m_p up(f)_p = sum_j pull_back(m)_j f_j. So a masked sum over the upsampled
    feature (what CISC-R computes) costs a sum over the small grid, without a (B, C, H, W) tensor."""
    rows = interpolation_matrix(mask.shape[-2], size[0], mask.device)  # (H, h)
    cols = interpolation_matrix(mask.shape[-1], size[1], mask.device)  # (W, w)
    return torch.einsum("Hh,...HW,Ww->...hw", rows, mask.float(), cols)


def masked_average(feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C): the average of the feature, upsampled to the mask's resolution, over the mask (B, H, W):
    sum_p up(f)_p m_p / (sum_p m_p + 5e-4). An empty mask gives the zero vector."""
    weights = pull_back(mask, feature.shape[-2:])
    total = torch.einsum("bchw,bhw->bc", feature.float(), weights)
    return total / (mask.float().sum(dim=(-2, -1)).unsqueeze(1) + AREA_EPS)


def cosine_to_prototypes(feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w): cosine similarity of every pixel of `feature` (B, C, h, w) with each of the image's K
    prototypes (B, K, C). A zero prototype gives 0 everywhere."""
    feature = F.normalize(feature.float(), dim=1, eps=COS_EPS)
    prototypes = F.normalize(prototypes.float(), dim=-1, eps=COS_EPS)
    return torch.einsum("bchw,bkc->bkhw", feature, prototypes)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def cisc_map(feature_u: torch.Tensor, prototype: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """S(x_u | x_q, m_q) (B, H, W): the cosine of x_u's pixels with the prototype masked_average(f_q, m_q)
    (B, C), computed on the feature grid and upsampled to `size`."""
    return upsample(cosine_to_prototypes(feature_u, prototype.unsqueeze(1)), size)[:, 0]


def binary_cross_entropy(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise BCE in float32 (torch's own refuses to run under fp16 autocast)."""
    p, t = probability.float(), target.float()
    log_p = torch.log(p).clamp(min=LOG_MIN)
    log_not_p = torch.log1p(-p).clamp(min=LOG_MIN)
    return -(t * log_p + (1 - t) * log_not_p)


def cross_image_consistency(cisc: torch.Tensor, region: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid pixels of BCE(S, m): pixels of the shared class should resemble the other
    image's prototype of it, all others should not. Zero when both regions are empty (S = 0, m = 0)."""
    bce = binary_cross_entropy(cisc.clamp(0, 1), region)
    valid = valid.float()
    return (bce * valid).sum() / valid.sum().clamp(min=1)


def rectify_weight(cisc: torch.Tensor, region_u: torch.Tensor) -> torch.Tensor:
    """Pixel weights 1 - |m_u - S| (B, H, W): S inside the pseudo-label's region of the shared class,
    1 - S outside it. A pixel the labeled image disagrees with counts less; no shared class gives 1."""
    return 1 - (region_u.float() - cisc.float()).abs()


def rectified_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    valid: torch.Tensor,
    count_all_pixels: bool = False,
) -> torch.Tensor:
    """sum_p weight_p CE_p over the valid pixels, divided by the number of valid pixels (or, with
    `count_all_pixels`, of all pixels: CISC-R's release, where crop padding adds zeros to the mean)."""
    ce = F.cross_entropy(logits.float(), target.masked_fill(~valid, 0), reduction="none")
    total = (ce * weight * valid).sum()
    count = valid.numel() if count_all_pixels else valid.sum().clamp(min=1)
    return total / count


def class_maps(label: torch.Tensor, nclass: int) -> torch.Tensor:
    """(B, K, H, W) float one-hot maps of a label map (B, H, W); IGNORE belongs to no class."""
    classes = torch.arange(nclass, device=label.device).view(1, nclass, 1, 1)
    return (label.unsqueeze(1) == classes).float()


def class_areas(label: torch.Tensor, nclass: int) -> torch.Tensor:
    """(B, K): the fraction of each image's pixels (padding included) that carry each class."""
    index = label.long().flatten(1).clamp(max=nclass)  # IGNORE counts in the extra column, then dropped
    counts = torch.zeros(label.shape[0], nclass + 1, device=label.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :nclass] / index.shape[1]


def choose_shared_classes(
    label_u: torch.Tensor,
    label_q: torch.Tensor,
    nclass: int,
    min_area: float,
    exclude_background: bool,
    noise: torch.Tensor,
    count: int = 1,
) -> torch.Tensor:
    """(B, K) bool: up to `count` classes per pair drawn among those covering >= min_area of both maps
    (class 0 left out with `exclude_background`); `noise` (B, K), uniform in [0, 1), makes the draw.
    A pair with no such class gets none (its regions stay empty, which leaves the pair inert)."""
    candidates = (class_areas(label_u, nclass) >= min_area) & (class_areas(label_q, nclass) >= min_area)
    if exclude_background:
        candidates[:, 0] = False
    score = torch.where(candidates, noise, torch.full_like(noise, -1.0))
    top = score.topk(min(count, nclass), dim=1).indices
    chosen = torch.zeros_like(candidates).scatter_(1, top, True)
    return chosen & candidates


def region_of(label: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixels of `label` (B, H, W) whose class is chosen (B, K); never padding."""
    nclass = chosen.shape[1]
    inside = label < nclass
    index = label.long().clamp(max=nclass - 1).flatten(1)
    return chosen.gather(1, index).view_as(label) & inside


def class_prototypes(feature: torch.Tensor, label: torch.Tensor, nclass: int) -> torch.Tensor:
    """(K, C): for each class, the sum over images of the image's masked average of the upsampled feature
    over that class (a zero vector for an image without it). Only directions matter to the cosines, so a
    sum serves as the mean; summing over processes gives the global one."""
    one_hot = class_maps(label, nclass)  # (B, K, H, W)
    weights = pull_back(one_hot, feature.shape[-2:])  # (B, K, h, w)
    total = torch.einsum("bchw,bkhw->bkc", feature.float(), weights)
    area = one_hot.sum(dim=(-2, -1)).unsqueeze(-1)
    return (total / (area + AREA_EPS)).sum(dim=0)


def class_scores(feature: torch.Tensor, prototypes: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B, K): for each image and class k, the mean over its labeled pixels (not IGNORE) of
    BCE(up(cos(f, prototype_k)), [label == k]); low when the class's pixels, and only they, resemble the
    prototype. CISC-R ranks labeled query images and unlabeled pseudo-labels by it."""
    nclass = prototypes.shape[0]
    cos = cosine_to_prototypes(feature, prototypes.expand(feature.shape[0], -1, -1))
    cos = upsample(cos, label.shape[-2:]).clamp(0, 1)  # (B, K, H, W)
    target = class_maps(label, nclass)
    valid = (label != IGNORE).unsqueeze(1).float()
    bce = binary_cross_entropy(cos, target) * valid
    return bce.sum(dim=(-2, -1)) / valid.sum(dim=(-2, -1)).clamp(min=1)


def reliability(scores: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B,): the sum of `scores` (B, K) over the classes present in each pseudo-label (lower: more
    reliable). A sum, as released: images with more classes score higher."""
    present = class_areas(label, scores.shape[1]) > 0
    return (scores * present).sum(dim=1)
