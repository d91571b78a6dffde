"""Pixel sets shared by the methods: full-resolution maps sampled at a feature grid's pixels, feature maps as
rows of pixels, and per-class top-k selection over them, batched over classes (no Python loop over
classes, images or pixels)."""

import math

import torch


def sample_to_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sample a full-resolution map (B, H, W) at the pixels a feature grid (h, w) sits on.

    The feature pixel i of a stride-4 map looks at input pixel round(i * (H - 1) / (h - 1)), the
    align_corners=True convention used for every resize in the model; for H = 4h - 3 (321, 513, 801) this
    is exactly mask[:, ::4, ::4]. Nearest sampling keeps labels and the ignore value 255 intact.
    """
    height, width = mask.shape[-2:]
    rows = torch.linspace(0, height - 1, size[0], device=mask.device).round().long()
    cols = torch.linspace(0, width - 1, size[1], device=mask.device).round().long()
    return mask[..., rows[:, None], cols[None, :]]


def pixels(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), pixels in (b, y, x) order."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def select_by_similarity(
    similarity: torch.Tensor, candidates: torch.Tensor, k: int, most_similar: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class (row), the indices of the k candidates most (or least) similar to its prototype.

    similarity, candidates: (..., K, N). Returns index (..., K, k') and chosen (..., K, k') bool with
    k' = min(k, N); a class with fewer than k' candidates has its first `count` positions chosen, in order
    of similarity.
    """
    k = min(k, similarity.shape[-1])
    score = similarity if most_similar else -similarity
    values, index = score.masked_fill(~candidates, -math.inf).topk(k, dim=-1)
    return index, values > -math.inf
