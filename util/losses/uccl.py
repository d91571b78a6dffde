"""UCCL's two consistency terms (Yin et al., ICASSP 2025), as plain functions of tensors.

All inputs live on one feature grid (h, w), the stride-4 grid of the decoder:
    feat_weak, feat_strong      (B, C, h, w)  features of the weak and the strong view of the same content
    logits_weak, logits_strong  (B, K, h, w)  low-resolution logits of the two views
    valid                       (B, h, w)     bool, False on crop padding

Each function has a `released` flag that reproduces the authors' released code instead of the paper's
method; docs/DIFFERENCES.md lists what changes.
"""

import torch
import torch.nn.functional as F

from util.losses import cosine_alignment_loss, cosine_map


def _group_sums(values: torch.Tensor, label: torch.Tensor, member: torch.Tensor, nclass: int) -> torch.Tensor:
    """Per image and class, the sum of `values` (B, N) over the member pixels of that class -> (B, K)."""
    one_hot = F.one_hot(label, nclass).to(values.dtype)  # (B, N, K)
    return torch.einsum("bn,bnk->bk", values * member, one_hot)


def sbu_loss(
    feat_weak: torch.Tensor,
    feat_strong: torch.Tensor,
    logits_weak: torch.Tensor,
    logits_strong: torch.Tensor,
    valid: torch.Tensor,
    thresh: float,
    similarity_sign: float = 1.0,
    released: bool = False,
) -> torch.Tensor:
    """SBU, semantic backpropagation update: similarity-weighted cross-entropy on uncertain pixels.

    With the weak pseudo-label y = argmax p_w and S(p) = sign * cos(F_w(p), F_s(p)), each image b and class
    c with a non-empty uncertain region M_bc = {y == c, uncertain, valid} gives softmax weights w_bc over
    M_bc, and
        L = 1/B sum_b 1/n_b sum_c sum_{p in M_bc} w_bc(p) CE(z_s(p), y(p)),   n_b = #non-empty classes.

    Paper (default): a pixel is uncertain when the weak or the strong view's confidence is at most
    `thresh`: the figure's unreliable-region filter takes both predictions, and a pixel is reliable only
    when both views are sure of it. So M covers every pixel that UniMatch's confident loss leaves out
    (weak confidence below its threshold) and those the strong view is unsure of. The weights are a
    softmax over M_bc of the similarity and carry no gradient, so only the strong logits are trained.

    released=True: uncertain means weak confidence <= thresh only; the softmax runs over the whole h*w
    map with logit S(p) inside M_bc and 0 elsewhere; the cross-entropy covers every valid pixel; the
    similarity keeps its gradient to the strong features.
    """
    B, K = logits_weak.shape[:2]
    feat_weak, logits_weak = feat_weak.detach(), logits_weak.detach().float()
    confidence, pseudo_label = logits_weak.softmax(dim=1).max(dim=1)
    uncertain = confidence <= thresh
    if not released:
        uncertain |= logits_strong.detach().float().softmax(dim=1).amax(dim=1) <= thresh
        feat_strong = feat_strong.detach()
    similarity = similarity_sign * cosine_map(feat_weak, feat_strong)
    ce = F.cross_entropy(logits_strong.float(), pseudo_label, reduction="none")

    label, member = pseudo_label.flatten(1), (uncertain & valid).flatten(1).float()  # (B, N)
    ce, similarity, valid = ce.flatten(1), similarity.flatten(1), valid.flatten(1).float()
    present = _group_sums(torch.ones_like(ce), label, member, K) > 0  # (B, K): non-empty M_bc
    if released:
        # w_bc(p) = exp(S(p) [p in M_bc]) / Z_bc over all N positions, where Z_bc = N + sum_{M_bc} (e^S - 1);
        # so sum_p valid ce w_bc = (sum_valid ce + sum_{M_bc} ce (e^S - 1)) / Z_bc.
        excess = similarity.exp() - 1
        numerator = (ce * valid).sum(1, keepdim=True) + _group_sums(ce * excess, label, member, K)
        normaliser = ce.shape[1] + _group_sums(excess, label, member, K)
    else:
        # softmax inside M_bc; |S| <= 1, so exp needs no max-shift
        weight = similarity.exp()
        numerator = _group_sums(ce * weight, label, member, K)
        normaliser = _group_sums(weight, label, member, K)
    per_class = torch.where(present, numerator / normaliser.clamp(min=1e-12), torch.zeros_like(numerator))
    num_classes = present.sum(1)
    per_image = per_class.sum(1) / num_classes.clamp(min=1)
    return per_image.sum() / B


def class_region_features(
    feature: torch.Tensor, weight: torch.Tensor, label: torch.Tensor, member: torch.Tensor, nclass: int
) -> torch.Tensor:
    """Weighted class-region vectors broadcast back to the pixels of their class.

    feature (B, C, N), weight (B, N) positive, label (B, N), member (B, N) bool. For each image b and
    class c, r_bc = sum_{p in R_bc} weight(p) f(p) / sum_{p in R_bc} weight(p) with R_bc = {label == c,
    member}; returns (B, C, N) with r_{b, label(p)} at every pixel p (zero where R_bc is empty).
    """
    one_hot = F.one_hot(label, nclass).to(feature.dtype) * member.unsqueeze(-1)  # (B, N, K)
    weighted = one_hot * weight.unsqueeze(-1)
    region = torch.einsum("bcn,bnk->bck", feature, weighted)  # (B, C, K)
    region = region / weighted.sum(1).unsqueeze(1).clamp(min=1e-12)
    index = label.unsqueeze(1).expand(-1, feature.shape[1], -1)
    return region.gather(2, index)


def ckr_loss(
    feat_weak: torch.Tensor,
    feat_strong: torch.Tensor,
    logits_weak: torch.Tensor,
    valid: torch.Tensor,
    released: bool = False,
) -> torch.Tensor:
    """CKR, class-aware knowledge regulation: align class-region features of the two views.

    Pixels are grouped by the weak prediction; each group's weighted mean feature is injected back into
    its pixels, for the weak view (target, no gradient) and the strong view, and
        L = 1 - mean_p cos(R_w(p), R_s(p)).

    Paper (default): the weight of a pixel is its weak class probability softmax(z_w)_c (the figure feeds
    softmax(p_w) to the injection), detached; the mean runs over valid pixels. Gradient reaches the
    strong features only.

    released=True: the weight is a softmax over the region of the raw logit z_w,c, and the weak
    logits keep their gradient (it flows through the strong view's weights); padded pixels keep their own
    feature and count in the mean over all B*h*w pixels.
    """
    B, K = feat_weak.shape[0], logits_weak.shape[1]
    feat_weak, feat_strong = feat_weak.float().flatten(2), feat_strong.float().flatten(2)  # (B, C, N)
    logits = logits_weak.float().flatten(2)  # (B, K, N)
    valid = valid.flatten(1)
    if not released:
        logits = logits.detach()
    top_logit, label = logits.max(dim=1)  # (B, N); the pixel's logit of its own predicted class
    if released:
        # softmax over each region of the raw logit, shifted by the region's largest logit (it cancels in
        # the normalisation) so that exp neither overflows nor underflows; pixels outside weigh 0
        region_max = torch.full((B, K), -torch.inf, device=logits.device)
        region_max = region_max.scatter_reduce(
            1, label, torch.where(valid, top_logit.detach(), -torch.inf), "amax"
        )
        shifted = top_logit - region_max.gather(1, label)
        weight = torch.where(valid, shifted, -torch.inf).exp()
    else:
        weight = logits.softmax(dim=1).amax(dim=1)  # the probability of the predicted class
    region_weak = class_region_features(feat_weak.detach(), weight.detach(), label, valid, K).detach()
    region_strong = class_region_features(feat_strong, weight, label, valid, K)
    if released:
        keep = valid.unsqueeze(1)
        region_weak = torch.where(keep, region_weak, feat_weak.detach())
        region_strong = torch.where(keep, region_strong, feat_strong)
        return 1 - cosine_map(region_weak, region_strong).mean()
    return cosine_alignment_loss(region_weak, region_strong, valid)
