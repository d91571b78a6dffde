"""CTT's terms (Xiao et al., "Semi-Supervised Semantic Segmentation with Cross Teacher Training",
Neurocomputing 2022) as plain functions of tensors, and the class-wise FIFO queue behind its memory banks.

    ClassMix     half of the classes of each image's pseudo-label pasted onto the next image of the batch
    CT           cross-teacher cross-entropy, weighted by the fraction of confident pixels of the batch
    HC           high-level contrast: student features against the class-wise bank of teacher features of
                 confidently-correct labeled pixels (positives: its class's entries; negatives: the others)
    LC           low-level contrast: a student's uncertain pixel against the peer student's feature of the
                 same content (positive) and both banks' entries of other classes (negatives)
    negatives    unreliable (high-entropy) unlabeled pixels as negatives of the classes they rank lowest,
                 from a per-class queue, against the bank's class prototype as positive

Shapes: K classes, D feature channels. Pixel sets are (N, D) with labels (N,); per-class samples are
(K, k) indices with a (K, k) bool mask of the positions that hold one; anchors are (M, D) rows with a
label (M,) and a mask (M,). Every per-class operation is a masked top-k, a gather or a one-hot product:
no Python loop over classes, images or pixels.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from util.dist import get_world_size
from util.losses.pixels import pixels, select_by_similarity

# A finite stand-in for -inf: the log-sum-exp of an empty set, so that its gradients stay zero, not NaN.
MASKED = torch.finfo(torch.float32).min
# Below about -87, exp in float32 underflows, and CPUs take a path 10-30 times slower than for normal inputs.
EXP_FLOOR = -80.0
# The lowest contrastive temperature: cosine similarities over it stay within +-40 (masked_logsumexp).
MIN_TEMPERATURE = 0.025


# --------------------------------------------------------------------------------------------- ClassMix
def classmix_mask(pseudo_label: torch.Tensor, valid: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Where image i keeps its own pixels when it is mixed with image i + 1 (mod B).

    pseudo_label (B, H, W) long, valid (B, H, W) bool (not crop padding), uniform (B, K) U(0, 1) draws.
    Of the n_i classes present in image i's valid pixels, floor(n_i / 2) are chosen uniformly without
    replacement (the n_i // 2 smallest draws among them); the mask is True on its valid pixels of a
    chosen class. Returns (B, H, W) bool.
    """
    batch, nclass = uniform.shape
    label = torch.where(valid, pseudo_label, nclass).flatten(1)  # padding -> an extra "class" K
    present = torch.zeros(batch, nclass + 1, dtype=torch.bool, device=label.device)
    present = present.scatter(1, label, True)[:, :nclass]
    score = torch.where(present, uniform, 2.0)  # absent classes sort last
    rank = score.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    chosen = present & (rank < (present.sum(dim=1, keepdim=True) // 2))
    chosen = torch.cat([chosen, chosen.new_zeros(batch, 1)], dim=1)  # padding is never chosen
    return chosen.gather(1, label).view_as(pseudo_label)


def classmix(image: torch.Tensor, paste: torch.Tensor) -> torch.Tensor:
    """Image i's pixels where `paste[i]` is True, image i + 1's (mod B) elsewhere.

    image: (B, ...) with the pixel grid last, as (B, H, W) or (B, C, H, W); paste: (B, H, W) bool.
    """
    keep = paste if image.dim() == paste.dim() else paste.unsqueeze(1)
    return torch.where(keep, image, image.roll(-1, dims=0))


# --------------------------------------------------------------------------------------------------- CT
def confident_counts(confidence: torch.Tensor, valid: torch.Tensor, thresh: float) -> torch.Tensor:
    """(confident valid pixels, valid pixels) as a float tensor of 2, to be summed over ranks."""
    return torch.stack([((confidence >= thresh) & valid).sum(), valid.sum()]).float()


def ct_loss(
    logits: torch.Tensor, pseudo_label: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """w * mean over valid pixels of CE(logits, pseudo_label), with the one scalar weight
    w = confident / valid from `counts` (confident_counts summed over every rank): ClassMix's uniform
    weighting. logits (B, K, H, W), pseudo_label (B, H, W), valid (B, H, W) bool."""
    weight = counts[0] / counts[1].clamp(min=1)
    ce = F.cross_entropy(logits.float(), pseudo_label, reduction="none")
    return weight * (ce * valid).sum() / valid.sum().clamp(min=1)


# ------------------------------------------------------------------------------------ per-class sets
def of_class(labels: torch.Tensor, nclass: int) -> torch.Tensor:
    """(K, N) bool: pixel n has label k. labels (N,); labels outside [0, K) (255) belong to no class."""
    return labels[None, :] == torch.arange(nclass, device=labels.device)[:, None]


def per_class_sample(
    candidates: torch.Tensor, score: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every class, its k candidate pixels with the highest score.

    candidates (K, N) bool, score (N,). With uniform draws as scores this is a uniform sample without
    replacement. Returns index (K, k') into the N pixels and chosen (K, k') bool, k' = min(k, N); a class
    with fewer candidates has its first positions chosen. Leading dimensions, (..., K, N) with score
    (..., N), are independent problems.
    """
    return select_by_similarity(score.unsqueeze(-2).expand_as(candidates), candidates, k, True)


def bank_candidates(
    logits: torch.Tensor, label: torch.Tensor, thresh: float, use_logit: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled pixels a memory bank may take: the teacher is right and confident.

    logits (N, K) of the teacher, label (N,) ground truth (255 = ignored). The confidence is the softmax
    maximum, or with use_logit the raw maximum logit (the released code's test). Returns (candidate (N,)
    bool, score (N,)): the bank takes the highest-scoring candidates of each class.
    """
    logits = logits.float()
    score = logits if use_logit else logits.softmax(dim=1)
    confidence, prediction = score.max(dim=1)
    return (prediction == label) & (confidence >= thresh), confidence


# --------------------------------------------------------------------------- unreliable pixels (negatives)
def unreliable_fraction(start: float, iteration: int, total_iters: int) -> float:
    """The share of pixels counted as unreliable: `start` at the first step, falling linearly to 0."""
    return start * max(0.0, 1.0 - iteration / max(total_iters, 1))


def unreliable_mask(prob: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """The valid pixels whose prediction entropy is in the top `fraction` of the batch's valid pixels.

    prob (..., N, K) probabilities, valid (N,) bool. The partition threshold is the (1 - fraction) quantile
    of the valid entropies (linear interpolation, as numpy.percentile), each leading index on its own.
    Returns (..., N) bool.
    """
    prob = prob.float()
    if fraction <= 0:
        return torch.zeros(prob.shape[:-1], dtype=torch.bool, device=prob.device)
    entropy = -(prob * prob.clamp(min=1e-12).log()).sum(dim=-1)
    nan = torch.full_like(entropy, float("nan"))
    thresh = torch.nanquantile(torch.where(valid, entropy, nan), 1.0 - fraction, dim=-1, keepdim=True)
    return valid & (entropy >= thresh)


def negative_candidates(prob: torch.Tensor, unreliable: torch.Tensor, skip_top: int) -> torch.Tensor:
    """(..., K, N) bool: pixel n is a negative of class c when it is unreliable and c is not among its
    `skip_top` most probable classes. prob (..., N, K), unreliable (..., N) bool."""
    rank = prob.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)  # (..., N, K)
    return ((rank >= skip_top) & unreliable[..., None]).transpose(-1, -2)


# ------------------------------------------------------------------------------------ contrastive core
def round_robin(index: torch.Tensor, chosen: torch.Tensor, budget: int) -> tuple[torch.Tensor, ...]:
    """Per-class picks (K, k) flattened to at most `budget` rows: every class's first pick, then every
    class's second, and so on, so the classes present share the budget evenly and a class with few picks
    leaves its share to the others. Returns index (M,), label (M,) and chosen (M,), M = min(budget, K k)."""
    nclass, k = index.shape
    label = torch.arange(nclass, device=index.device)[:, None].expand(nclass, k)
    turn = torch.arange(k, device=index.device)[None, :] * nclass + label
    order = torch.where(chosen, turn, nclass * k).flatten().argsort(stable=True)[:budget]
    return index.flatten()[order], label.flatten()[order], chosen.flatten()[order]


def _log_of_sum(total: torch.Tensor, shift: float) -> torch.Tensor:
    """shift + log(total) for sums of exp(value - shift); MASKED where the sum is empty (zero), with a zero
    gradient: the clamp keeps log finite, so that `where`'s unselected branch gets 0, not NaN."""
    return torch.where(total > 0, shift + total.clamp(min=torch.finfo(torch.float32).tiny).log(), MASKED)


def masked_logsumexp(values: torch.Tensor, weight: torch.Tensor, bound: float) -> torch.Tensor:
    """log sum_j exp(values[..., j]) over the entries whose weight (0 or 1, broadcastable to values) is 1,
    for values in [-bound, bound] with bound <= 40 (similarities of unit vectors over a temperature of at
    least 0.025). Returns (..., 1); MASKED for a row with no entry, with a zero gradient.

    The bound stands in for the row maximum: exp then sees values in [-2 bound, 0], which neither overflow
    nor leave float32's normal range. Written out rather than torch.logsumexp of a masked_fill(-large):
    exp would see the masked entries (CPUs take their slow path for each), and masked_fill and the row
    maximum are further passes over the (anchors x entries) matrix.
    """
    shifted = (values - bound) * weight  # the counted entries in [-2 bound, 0], the others 0
    return _log_of_sum((shifted.exp() * weight).sum(dim=-1, keepdim=True), bound)


def info_nce(
    positive: torch.Tensor,
    positive_mask: torch.Tensor,
    negative: torch.Tensor,
    label: torch.Tensor,
    anchor_mask: torch.Tensor,
    nclass: int,
) -> torch.Tensor:
    """Class-balanced InfoNCE.

    positive (..., M, P): similarities / temperature of each anchor to its positives, positive_mask
    broadcasting to it; negative (..., M, 1): log sum_q e^s(a,q) over each anchor's negatives (MASKED for
    none); label, anchor_mask (..., M). For an anchor a and a positive p:
    -log(e^s(a,p) / (e^s(a,p) + sum_q e^s(a,q))). Averaged over the anchor's positives, over the anchors of
    a class, then over the classes that have an anchor with a positive: (...). Zero if none has. Leading
    dimensions (one per network) are independent problems.
    """
    positive = positive.float()
    # -log(e^p / (e^p + e^n)) = softplus(n - p); a difference below EXP_FLOOR adds less than 1e-34
    pair = F.softplus((negative - positive).clamp(min=EXP_FLOOR))  # (..., M, P)
    positive_mask = positive_mask.expand_as(pair).to(pair.dtype)
    count = positive_mask.sum(dim=-1)
    per_anchor = (pair * positive_mask).sum(dim=-1) / count.clamp(min=1)  # (..., M)
    used = F.one_hot(label, nclass).to(pair.dtype) * (anchor_mask & (count > 0))[..., None]  # (..., M, K)
    anchors = used.sum(dim=-2)
    per_class = (used * per_anchor[..., None]).sum(dim=-2) / anchors.clamp(min=1)  # (..., K)
    has = (anchors > 0).to(pair.dtype)
    return (per_class * has).sum(dim=-1) / has.sum(dim=-1).clamp(min=1)


def _class_similarities(anchors: torch.Tensor, entries: torch.Tensor, temperature: float) -> torch.Tensor:
    """Similarities / temperature of unit anchors (..., M, D) to entries (..., K, N, D): (..., K, M, N),
    one matrix per class (a batched matmul)."""
    return (anchors / temperature).unsqueeze(-3) @ entries.float().transpose(-1, -2)


def _other_classes_logsumexp(
    similarity: torch.Tensor, filled: torch.Tensor, label: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log sum of exp(similarity) over the filled entries of the classes other than each anchor's label:
    similarity (..., K, M, N) from _class_similarities, filled (..., K, N), label (..., M) -> (..., M, 1).

    Per class, the sum over its filled entries is a matrix-vector product, so no (anchors x entries) mask
    is built; the other classes' sums are then added up. Shifted by the bound 1 / temperature, as in
    masked_logsumexp (temperature >= MIN_TEMPERATURE).
    """
    bound = 1 / temperature
    per_class = (similarity - bound).exp() @ filled.to(torch.float32).unsqueeze(-1)  # (..., K, M, 1)
    per_class = per_class.squeeze(-1).transpose(-1, -2)  # (..., M, K)
    other = label[..., None] != torch.arange(per_class.shape[-1], device=label.device)
    return _log_of_sum((per_class * other).sum(dim=-1, keepdim=True), bound)


def _own_class(similarity: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(..., K, M, N) from _class_similarities -> (..., M, N): each anchor's entries of its own label."""
    index = label[..., None, :, None].expand(*label.shape[:-1], 1, *similarity.shape[-2:])
    return similarity.gather(-3, index).squeeze(-3)


def _rows(table: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(..., K, N) -> (..., M, N): row label[m] of the table for every anchor m."""
    return table.gather(-2, label[..., None].expand(*label.shape, table.shape[-1]))


def hc_loss(
    anchors: torch.Tensor,
    label: torch.Tensor,
    anchor_mask: torch.Tensor,
    bank: torch.Tensor,
    filled: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """HC: anchors (..., M, D) of class `label` against the bank (..., K, N, D): positives are the filled
    entries of the anchor's class, negatives the filled entries of every other class. filled (..., K, N)."""
    anchors = F.normalize(anchors.float(), dim=-1)
    similarity = _class_similarities(anchors, bank, temperature)  # (..., K, M, N)
    positive = _own_class(similarity, label)  # (..., M, N)
    negative = _other_classes_logsumexp(similarity, filled, label, temperature)
    return info_nce(positive, _rows(filled, label), negative, label, anchor_mask, bank.shape[-3])


def lc_loss(
    anchors: torch.Tensor,
    label: torch.Tensor,
    anchor_mask: torch.Tensor,
    peer: torch.Tensor,
    banks: torch.Tensor,
    filled: torch.Tensor,
    temperature: float = 0.5,
) -> torch.Tensor:
    """LC: each anchor (..., M, D) against the peer network's feature of the same pixel (..., M, D; no
    gradient) as its one positive and, as negatives, the filled entries of other classes than `label` of
    both banks: banks (K, 2N, D) = the two (K, N, D) banks concatenated along the entries, filled (K, 2N)."""
    anchors = F.normalize(anchors.float(), dim=-1)
    positive = (anchors * F.normalize(peer.detach().float(), dim=-1)).sum(dim=-1, keepdim=True)
    similarity = _class_similarities(anchors, banks, temperature)
    negative = _other_classes_logsumexp(similarity, filled, label, temperature)
    return info_nce(positive / temperature, anchor_mask[..., None], negative, label, anchor_mask,
                    banks.shape[-3])  # fmt: skip


def negative_queue_loss(
    anchors: torch.Tensor,
    label: torch.Tensor,
    anchor_mask: torch.Tensor,
    bank: torch.Tensor,
    filled: torch.Tensor,
    queue: torch.Tensor,
    queue_filled: torch.Tensor,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Unreliable pixels as negatives: anchors (..., M, D) of class `label` against the prototype of that
    class (the mean of the bank's filled entries, (..., K, N, D) with filled (..., K, N)) as positive and the
    filled entries of that class's negative queue (..., K, Q, D), queue_filled (..., K, Q), as negatives."""
    anchors = F.normalize(anchors.float(), dim=-1)
    weights = filled.to(torch.float32)
    prototype = (weights[..., None] * bank.float()).sum(dim=-2) / weights.sum(-1, keepdim=True).clamp(min=1)
    prototype = _rows(F.normalize(prototype, dim=-1), label)  # (..., M, D)
    positive = (anchors * prototype).sum(dim=-1, keepdim=True) / temperature
    has_prototype = _rows(filled.any(dim=-1, keepdim=True), label)  # (..., M, 1)
    # each anchor against its own class's queue only
    similarity = _own_class(_class_similarities(anchors, queue, temperature), label)
    weight = _rows(queue_filled, label).to(torch.float32)  # (..., M, Q)
    negative = masked_logsumexp(similarity, weight, 1 / temperature)
    return info_nce(positive, has_prototype, negative, label, anchor_mask, bank.shape[-3])


# ------------------------------------------------------------------------------------------ the queues
def gather_from_ranks(features: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's per-class candidates, side by side in rank order: (..., K, m, D), (..., K, m) on each
    rank -> (..., K, W m, D), (..., K, W m). One all_gather (the mask travels as an extra channel)."""
    world = get_world_size()
    if world == 1:
        return features, chosen
    packed = torch.cat([features.float(), chosen.to(torch.float32)[..., None]], dim=-1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(world)]
    torch.distributed.all_gather(parts, packed)
    packed = torch.cat(parts, dim=-2)
    return packed[..., :-1], packed[..., -1] > 0.5


@dataclass
class ClassQueue:
    """A FIFO queue of unit feature vectors per class: features (K, N, D); `count` (K,) entries filled
    so far (at most N) and `head` (K,) the slot the next entry goes to. Rows fill from slot 0; once full,
    each new entry replaces the oldest. Updates replace the tensors (never write into them), so a
    state_dict taken earlier keeps its values."""

    features: torch.Tensor
    count: torch.Tensor
    head: torch.Tensor

    @classmethod
    def empty(cls, nclass: int, size: int, dim: int, device=None) -> "ClassQueue":
        zeros = torch.zeros(nclass, dtype=torch.long, device=device)
        return cls(torch.zeros(nclass, size, dim, device=device), zeros, zeros.clone())

    @property
    def size(self) -> int:
        return self.features.shape[1]

    def filled(self) -> torch.Tensor:
        """(K, N) bool: the slots that hold an entry."""
        return torch.arange(self.size, device=self.count.device)[None, :] < self.count[:, None]

    @torch.no_grad()
    def push(self, features: torch.Tensor, chosen: torch.Tensor) -> None:
        """Append the chosen rows of features (K, m, D), in order, to each class's queue; m <= N.

        Written as one scatter over all classes: the chosen rows are moved to the front (stable), row j
        goes to slot (head + j) mod N, and unchosen rows write back what the slot holds. The m slots of a
        class are distinct because m <= N.
        """
        nclass, m, dim = features.shape
        if m > self.size:
            raise ValueError(f"cannot push {m} entries per class into a queue of {self.size}")
        order = torch.argsort((~chosen).to(torch.uint8), dim=1, stable=True)
        chosen = chosen.gather(1, order)
        features = features.gather(1, order[..., None].expand(-1, -1, dim))
        slots = (self.head[:, None] + torch.arange(m, device=self.head.device)) % self.size  # (K, m)
        slots = slots[..., None].expand(-1, -1, dim)
        new = F.normalize(features.float(), dim=-1)
        new = torch.where(chosen[..., None], new, self.features.gather(1, slots))
        added = chosen.sum(dim=1)
        self.features = self.features.scatter(1, slots, new)
        self.head = (self.head + added) % self.size
        self.count = (self.count + added).clamp(max=self.size)

    def state_dict(self) -> dict:
        return {"features": self.features, "count": self.count, "head": self.head}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(
                f"queue in the checkpoint has shape {tuple(state['features'].shape)}, this run needs "
                f"{tuple(self.features.shape)} (classes x entries x feature channels)"
            )
        device = self.features.device
        self.features = state["features"].to(device, torch.float32)
        self.count = state["count"].to(device, torch.long)
        self.head = state["head"].to(device, torch.long)


class ContrastMemory:
    """What CTT's contrastive terms read besides the step's own pixels, for each teacher ('a', 'b'): a memory
    bank of its features of labeled pixels it gets right with confidence (HC's positives, every term's
    negatives), and a queue of its unreliable unlabeled pixels, the negatives of the classes they rank
    lowest. Both are filled after each optimizer step from every process's candidates."""

    TEACHERS = ("a", "b")

    def __init__(self, nclass: int, dim: int, bank_size: int, queue_size: int, device=None):
        self.nclass = nclass
        self.banks = {n: ClassQueue.empty(nclass, bank_size, dim, device) for n in self.TEACHERS}
        self.queues = {n: ClassQueue.empty(nclass, queue_size, dim, device) for n in self.TEACHERS}

    def stacked_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank A's and bank B's entries (2, K, N, D) and which slots hold one (2, K, N)."""
        return torch.stack([b.features for b in self.banks.values()]), torch.stack(
            [b.filled() for b in self.banks.values()]
        )

    def stacked_queues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue A's and queue B's entries (2, K, N, D) and which slots hold one (2, K, N)."""
        return torch.stack([q.features for q in self.queues.values()]), torch.stack(
            [q.filled() for q in self.queues.values()]
        )

    def banks_full(self) -> torch.Tensor:
        """Whether every class of both banks is full (a bool tensor: no host sync)."""
        return torch.stack([b.count.min() for b in self.banks.values()]).min() >= self.banks["a"].size

    def bank_filled_share(self) -> torch.Tensor:
        """The share of both banks' slots that hold an entry."""
        return torch.stack([b.filled().float().mean() for b in self.banks.values()]).mean()

    def push_bank(
        self, name: str, logits_low: torch.Tensor, decoder: torch.Tensor, label: torch.Tensor, thresh: float,
        use_logit: bool, per_step: int,
    ) -> None:  # fmt: skip
        """Bank `name` takes its teacher's decoder features (B, D, h, w) of the labeled pixels it gets right
        with confidence (logits_low (B, K, h, w) against label (B, h, w) on the same grid): the most
        confident `per_step` per class and process, from every process."""
        label = label.flatten()
        candidate, score = bank_candidates(pixels(logits_low), label, thresh, use_logit)
        index, chosen = per_class_sample(of_class(label, self.nclass) & candidate, score, per_step)
        self.banks[name].push(*gather_from_ranks(pixels(decoder)[index], chosen))

    def push_negatives(
        self, logits_low: torch.Tensor, decoder: torch.Tensor, valid: torch.Tensor, share: float,
        skip_top: int, uniform: torch.Tensor, per_step: int,
    ) -> None:  # fmt: skip
        """Both queues take a random sample of their teacher's unreliable weak-view pixels, for each class
        they rank below their `skip_top` most probable ones. logits_low, decoder: teacher A's and teacher
        B's maps stacked on a leading 2 (2, B, K, h, w), (2, B, D, h, w); valid (B, h, w) bool; `share`:
        the unreliable share of the valid pixels; uniform (2, B h w) draws that make the sample."""
        prob = pixels(logits_low.flatten(0, 1).float().softmax(dim=1)).unflatten(0, (2, -1))  # (2, N, K)
        unreliable = unreliable_mask(prob, valid.flatten(), share)  # (2, N)
        candidates = negative_candidates(prob, unreliable, skip_top)  # (2, K, N)
        index, chosen = per_class_sample(candidates, uniform, per_step)  # (2, K, k)
        features = pixels(decoder.flatten(0, 1)).unflatten(0, (2, -1))  # (2, N, D)
        teacher = torch.arange(2, device=index.device)[:, None, None]
        features, chosen = gather_from_ranks(features[teacher, index], chosen)  # (2, K, W k, D), (2, K, W k)
        for i, name in enumerate(self.TEACHERS):
            self.queues[name].push(features[i], chosen[i])

    def state_dict(self) -> dict:
        return {
            "banks": {n: q.state_dict() for n, q in self.banks.items()},
            "queues": {n: q.state_dict() for n, q in self.queues.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"banks", "queues"}:
            raise ValueError(f"CTT needs its memory banks and queues, but the checkpoint has {sorted(state)}")
        for n in self.TEACHERS:
            self.banks[n].load_state_dict(state["banks"][n])
            self.queues[n].load_state_dict(state["queues"][n])
