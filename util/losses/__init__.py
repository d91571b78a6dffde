"""Loss functions shared by the methods, as plain functions of tensors.

Shapes: logits (B, K, H, W), labels (B, H, W) long, confidence (B, H, W) float, ignore_mask (B, H, W)
with 255 on pixels that carry no information (crop padding).
"""

import torch
import torch.nn.functional as F

IGNORE = 255
COS_EPS = 1e-6  # the eps of every cosine similarity, as in UCCL's and MLCL's released code


def cosine_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along dim 1 of two (B, C, ...) maps -> (B, ...), in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=1, eps=COS_EPS)


def cosine_alignment_loss(target: torch.Tensor, feature: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - mean over the valid pixels of cos(target, feature); the target gets no gradient.

    target, feature: (B, C, ...) maps of the same content; valid: (B, ...) bool (not crop padding).
    """
    cos = cosine_map(target.detach(), feature)
    valid = valid.to(cos.dtype)
    return 1 - (cos * valid).sum() / valid.sum().clamp(min=1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not `ignore_index`; zero if there are none."""
    valid = target != ignore_index
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return loss / valid.sum().clamp(min=1)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 200000,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """Online hard example mining, as UniMatch's `ProbOhemCrossEntropy2d` (its Cityscapes labeled loss).

    Keeps the pixels whose probability of the true class is at most max(thresh, the min_kept-th smallest
    such probability); if fewer than min_kept pixels are valid, every valid pixel is kept. The choice
    between the two is made on the device (no host sync in the step).
    """
    with torch.no_grad():
        valid = target != ignore_index
        keep = valid
        if 0 < min_kept <= valid.numel():
            prob = logits.float().softmax(dim=1)
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            prob_true = prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
            prob_true = torch.where(valid, prob_true, torch.ones_like(prob_true))  # invalid pixels rank last
            kth = prob_true.flatten().kthvalue(min_kept).values
            hard = valid & (prob_true <= kth.clamp(min=thresh))
            keep = torch.where(valid.sum() >= min_kept, hard, valid)
        hard_target = torch.where(keep, target, torch.full_like(target, ignore_index))
    return cross_entropy(logits, hard_target, ignore_index)


def confident_cross_entropy(
    logits: torch.Tensor,
    pseudo_label: torch.Tensor,
    confidence: torch.Tensor,
    ignore_mask: torch.Tensor,
    thresh: float,
) -> torch.Tensor:
    """UniMatch's unlabeled loss: cross-entropy on pixels with confidence >= thresh.

    The sum is divided by the number of valid (non-padding) pixels, not by the number of confident ones,
    as in UniMatch: a batch with few confident pixels contributes a small loss.
    """
    valid = ignore_mask != IGNORE
    loss = F.cross_entropy(logits.float(), pseudo_label, reduction="none")
    loss = loss * ((confidence >= thresh) & valid)
    return loss.sum() / valid.sum().clamp(min=1)


def build_labeled_criterion(cfg: dict):
    """The supervised loss named by the config: plain cross-entropy or OHEM (Cityscapes)."""
    if cfg["criterion"] == "OHEM":
        thresh, min_kept = cfg["ohem_thresh"], cfg["ohem_min_kept"]
        return lambda logits, target: ohem_cross_entropy(logits, target, thresh, min_kept)
    return cross_entropy
