"""MLCL / MCCL terms as plain functions of tensors, and the per-class prototype memory.

FKA (feature knowledge alignment) = point-to-point alignment of weak and strong features of the same
content + prototype-based intra-class compactness; SAI (self-adaptive intervention) = noise injection
and feature masking on the strong features with a strength set per image by the weak/strong similarity.
Where the released code differs from the paper, a flag reproduces it (docs/DIFFERENCES.md).

Shapes: feature maps (B, C, h, w); pixel sets (N, C) with N = B * h * w; per-class tensors have K rows.
Every selection is a batched top-k over a (K, N) similarity matrix masked per class, every per-class sum
a one-hot matmul: no Python loop over classes, images or pixels.
"""

import math

import torch
import torch.nn.functional as F

from util.dist import all_reduce_sum, get_world_size
from util.losses import cosine_alignment_loss, cosine_map
from util.losses.pixels import select_by_similarity


# --------------------------------------------------------------------------------------------------- FKA
def point_to_point_loss(weak: torch.Tensor, strong: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L_p2p = 1 - mean over valid pixels of cos(weak.detach(), strong).

    weak, strong: (B, C, h, w) features of the same content; valid: (B, h, w) bool (not crop padding).
    """
    return cosine_alignment_loss(weak, strong, valid)


def class_sums(
    features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, nclass: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sum (K, C) and count (K,) of the pixels (N, C) with `mask` (N,), by a one-hot matmul."""
    onehot = (labels[:, None] == torch.arange(nclass, device=labels.device)) & mask[:, None]
    onehot = onehot.to(torch.float32)
    return onehot.t() @ features.float(), onehot.sum(dim=0)


def released_anchor_order(index: torch.Tensor) -> torch.Tensor:
    """The released selection order of n anchors: top-1, top-1, top-2, ..., top-(n-1).

    Position j takes rank max(j - 1, 0): the top-1 appears twice and the n-th is never taken. A class with
    `count` < n candidates still fills positions 0..count-1, so the chosen mask of `index` is unchanged.
    """
    ranks = (torch.arange(index.shape[1], device=index.device) - 1).clamp(min=0)
    return index[:, ranks]


def pair_positionally(has_anchor: torch.Tensor, has_strong: torch.Tensor) -> torch.Tensor:
    """Released pairing: the i-th class with anchors (in class order) takes the strong samples of the i-th
    class with strong samples. Returns the partner class of every class (K,) (meaningless where a class
    has no anchors). Equal to the identity when every class with strong samples also has anchors."""
    order = torch.argsort((~has_strong).to(torch.uint8), stable=True)  # classes with strong samples first
    rank = (has_anchor.long().cumsum(0) - 1).clamp(min=0)
    return order[rank]


def prototype_loss(
    anchors: torch.Tensor,
    anchor_mask: torch.Tensor,
    strong: torch.Tensor,
    strong_mask: torch.Tensor,
    pairing: str = "class",
    denominator: str = "anchors",
) -> torch.Tensor:
    """Intra-class compactness: 1 - (sum over anchors of the max cosine to the strong samples paired
    with the anchor's class) / denominator.

    anchors (K, n, C) with anchor_mask (K, n); strong (K, m, C) with strong_mask (K, m).
    pairing: 'class' (anchors of class c meet strong samples of class c) or 'positional' (released).
    denominator: 'anchors' (a mean over anchors) or 'strong' (released: the number of strong samples of
    the paired classes). The anchors are detached; the gradient reaches only the nearest strong sample of
    each anchor. Zero when no anchor has a strong partner.
    """
    if pairing == "positional":
        partner = pair_positionally(anchor_mask.any(dim=1), strong_mask.any(dim=1))
        strong, strong_mask = strong[partner], strong_mask[partner]
    elif pairing != "class":
        raise ValueError(f"unknown pairing {pairing!r}")
    a = F.normalize(anchors.detach().float(), dim=-1)
    s = F.normalize(strong.float(), dim=-1)
    cos = torch.bmm(a, s.transpose(1, 2)).masked_fill(~strong_mask[:, None, :], -math.inf)
    nearest = cos.max(dim=2).values  # (K, n)
    used = anchor_mask & strong_mask.any(dim=1, keepdim=True)
    total = torch.where(used, nearest, torch.zeros_like(nearest)).sum()
    if denominator == "anchors":
        count = used.sum()
    elif denominator == "strong":
        count = (strong_mask.sum(dim=1) * used.any(dim=1)).sum()
    else:
        raise ValueError(f"unknown denominator {denominator!r}")
    count = count.to(total.dtype)
    return torch.where(count > 0, 1 - total / count.clamp(min=1), torch.zeros_like(total))


def fka_prototype_loss(
    weak: torch.Tensor,
    strong: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor,
    valid: torch.Tensor,
    memory: torch.Tensor,
    initialised: torch.Tensor,
    num_anchors: int = 16,
    num_strong: int = 256,
    thresh: float = 0.95,
    pairing: str = "class",
    anchor_selection: str = "topk",
    denominator: str = "anchors",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FKA prototype term on pixel sets of the same content.

    weak, strong: (N, C) pixels of the weak and the strong view; labels, confidence, valid: (N,) weak
    pseudo-label, its confidence and a not-padding mask. memory (K, C) and initialised (K,) bool: the
    prototypes; a class not yet initialised uses the mean of its anchor candidates instead (the value the
    memory will start from), so its selection is not an arbitrary order of ties with a zero vector.

    Anchors: the `num_anchors` confident (> thresh) weak pixels of each class most similar to its
    prototype ('topk'; 'released' = top-1 twice, the n-th never). Strong samples: the `num_strong` strong
    pixels of each class (no confidence filter) least similar to it. Returns (loss, number of classes
    with anchors).
    """
    nclass = memory.shape[0]
    weak = weak.detach().float()
    anchor_candidates = valid & (confidence > thresh)
    sums, counts = class_sums(weak, labels, anchor_candidates, nclass)
    stand_in = sums / counts.clamp(min=1)[:, None]
    prototypes = torch.where(initialised[:, None], memory.float(), stand_in)
    prototypes = F.normalize(prototypes, dim=1)
    classes = labels[None, :] == torch.arange(nclass, device=labels.device)[:, None]  # (K, N)

    sim_weak = prototypes @ F.normalize(weak, dim=1).t()
    index, anchor_mask = select_by_similarity(sim_weak, classes & anchor_candidates, num_anchors, True)
    if anchor_selection == "released":
        index = released_anchor_order(index)
    elif anchor_selection != "topk":
        raise ValueError(f"unknown anchor_selection {anchor_selection!r}")
    anchors = weak[index]  # (K, n, C)

    sim_strong = prototypes @ F.normalize(strong.detach().float(), dim=1).t()
    index_s, strong_mask = select_by_similarity(sim_strong, classes & valid, num_strong, False)
    samples = strong[index_s]  # (K, m, C), with gradient
    loss = prototype_loss(anchors, anchor_mask, samples, strong_mask, pairing, denominator)
    return loss, anchor_mask.any(dim=1).sum()


def ema_update(
    memory: torch.Tensor,
    initialised: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    momentum: float,
    released: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prototype step from per-class feature sums (K, C) and counts (K,).

    A class seen for the first time starts at its mean; an initialised one moves to
    momentum * memory + (1 - momentum) * mean. released=True keeps the released skip: once a class is
    initialised in this call, every initialised class with a higher id keeps its old value.
    Returns the new (memory, initialised); the inputs are not modified.
    """
    present = counts > 0
    mean = sums / counts.clamp(min=1)[:, None]
    start = present & ~initialised
    move = present & initialised
    if released:
        ids = torch.arange(memory.shape[0], device=memory.device)
        first_start = torch.where(start, ids, torch.full_like(ids, memory.shape[0])).min()
        move = move & (ids < first_start)
    new = torch.where(start[:, None], mean, memory)
    new = torch.where(move[:, None], momentum * memory + (1 - momentum) * mean, new)
    return new, initialised | present


class PrototypeMemory:
    """One prototype row per class (K, C) and a per-class 'initialised' flag, kept equal on every rank."""

    def __init__(self, nclass: int, channels: int, device=None):
        self.memory = torch.zeros(nclass, channels, device=device)
        self.initialised = torch.zeros(nclass, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        momentum: float,
        released: bool = False,
    ) -> None:
        """EMA step from the pixels (N, C) with `mask`, labelled `labels`, of every rank.

        Default: per-class sums and counts are summed over ranks first, so every rank takes the same
        step from the global class mean (as one process with the global batch would); a class seen on
        one rank only is not diluted. released=True: each rank steps on its own batch (with the skip of
        `ema_update`), then the memories are averaged over ranks, zeros of ranks that never saw a class
        included.
        """
        nclass = self.memory.shape[0]
        sums, counts = class_sums(features.detach(), labels, mask, nclass)
        if not released:
            packed = all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1))
            self.memory, self.initialised = ema_update(
                self.memory, self.initialised, packed[:, :-1], packed[:, -1], momentum
            )
            return
        memory, initialised = ema_update(self.memory, self.initialised, sums, counts, momentum, True)
        self.memory = all_reduce_sum(memory) / get_world_size()
        self.initialised = all_reduce_sum(initialised.to(torch.float32)) > 0

    def state_dict(self) -> dict:
        # The tensors themselves, on their device: the engine copies the state before every step (to put
        # it back if the step is skipped), so a copy to the host here would cost a sync per step. `update`
        # replaces the tensors rather than writing into them, so a saved reference never changes.
        return {"memory": self.memory, "initialised": self.initialised}

    def load_state_dict(self, state: dict) -> None:
        memory, initialised = state["memory"], state["initialised"]
        if memory.shape != self.memory.shape or initialised.shape != self.initialised.shape:
            raise ValueError(
                f"prototype memory in the checkpoint has shape {tuple(memory.shape)}, this run needs "
                f"{tuple(self.memory.shape)} (nclass x head_channels)"
            )
        self.memory = memory.to(self.memory.device, torch.float32)
        self.initialised = initialised.to(self.initialised.device, torch.bool)


# --------------------------------------------------------------------------------------------------- SAI
def sai_strength(similarity: torch.Tensor) -> torch.Tensor:
    """s = 0.15 (1 + v): the noise amplitude, and 1 - s the centre of the masking factor.

    A more consistent image (higher v) gets stronger noise and a lower masking threshold. The released
    code applies this twice to the masking strength when noise also runs: sai_strength(sai_strength(v)).
    """
    return 0.15 * (1 + similarity)


def per_image_similarity(weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """v[b] = mean over all pixels of cos(weak[b], strong[b]), both detached: (B, C, h, w) -> (B,)."""
    return cosine_map(weak.detach(), strong.detach()).mean(dim=(1, 2))


def noise_injection(feature: torch.Tensor, strength: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """F (1 + r), r = (2u - 1) s_b ~ U(-s_b, s_b) elementwise; uniform: U(0, 1) draws of F's shape."""
    r = (2 * uniform - 1) * strength.view(-1, 1, 1, 1)
    return feature * (1 + r)


def feature_masking(feature: torch.Tensor, strength: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Zero the most activated positions of each image (CCT's FeatureDrop, made adaptive).

    a = channel mean of F (B, 1, h, w); keep a < max(a) * f_b with f_b = (1 - s_b - 0.1) + 0.2 u_b, i.e.
    f_b ~ U(1 - s_b - 0.1, 1 - s_b + 0.1); uniform: (B,) U(0, 1) draws. No gradient through the mask.
    """
    attention = feature.detach().float().mean(dim=1, keepdim=True)
    peak = attention.amax(dim=(2, 3), keepdim=True)
    factor = (1 - strength - 0.1 + 0.2 * uniform).view(-1, 1, 1, 1)
    return feature * (attention < peak * factor).to(feature.dtype)


def softmax_mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over (B, K, H, W) of (softmax(logits) - target)^2; the target is a probability map."""
    return (logits.float().softmax(dim=1) - target.detach()).pow(2).mean()


def sai_weight(final_weight: float, iteration: int, total_iters: int) -> float:
    """The released ramp over the whole run: final_w * exp(-10 (1 - t/T)^2) (a squared sigmoid ramp)."""
    t = min(max(iteration / max(total_iters, 1), 0.0), 1.0)
    return final_weight * math.exp(-10.0 * (1.0 - t) ** 2)
