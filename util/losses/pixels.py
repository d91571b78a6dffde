"""Pixel sets shared by the contrastive methods (MLCL, CTT): feature maps as rows of pixels, and per-class
top-k selection over them, batched over classes (no Python loop over classes, images or pixels)."""

import math

import torch


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
