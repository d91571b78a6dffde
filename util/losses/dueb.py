"""DUEB's terms (Thakur and Kurmi, WACV 2025), as plain functions of tensors.

Two branches teach each other through CPCL's intersection and union pseudo-labels; each branch also
carries an aleatoric-uncertainty loss on a predicted per-pixel variance and an energy loss.

Shapes: logits (B, K, H, W), variance (B, 1, H, W) >= 0, labels (B, H, W) long with 255 = ignored,
confidence (B, H, W). Each loss has a `released` flag that reproduces the authors' code instead of the
paper's method; docs/DIFFERENCES.md lists what changes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from util.dist import all_reduce_sum
from util.losses import IGNORE


# ------------------------------------------------------------------ intersection / union pseudo-labels
def confusion_counts(
    pred_1: torch.Tensor, pred_2: torch.Tensor, valid: torch.Tensor, nclass: int
) -> torch.Tensor:
    """(K, K) counts of the pixels where branch 1 predicts row i and branch 2 column j, over `valid` pixels.

    One scatter-add into K*K + 1 bins on the device (invalid pixels go to the last bin, then dropped);
    torch.bincount would read the largest index back to the host to size its output. The caller sums the
    counts over ranks before `conflict_rates`, so every rank sees the global batch's matrix.
    """
    index = (pred_1 * nclass + pred_2).flatten()
    index = torch.where(valid.flatten(), index, torch.full_like(index, nclass * nclass))
    counts = torch.zeros(nclass * nclass + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[: nclass * nclass].view(nclass, nclass)


def conflict_rates(counts: torch.Tensor) -> torch.Tensor:
    """Normalised per-class conflict rates r (K,), float64, from confusion counts (rows: branch 1).

    Each class first gets one agreeing pixel (as CPCL appends 0..K-1 to both predictions), so a class
    that one branch never predicts has a zero rate there instead of 0/0. Then
        r_c = (col_c - K_cc) / col_c + (row_c - K_cc) / row_c,     r <- r / (sum r + 1e-6):
    the fraction of branch 2's and of branch 1's class-c pixels that the other branch labels differently.
    """
    counts = counts.double() + torch.eye(counts.shape[0], dtype=torch.double, device=counts.device)
    agree = counts.diagonal()
    rate = (counts.sum(0) - agree) / counts.sum(0) + (counts.sum(1) - agree) / counts.sum(1)
    return rate / (rate.sum() + 1e-6)  # float64, as CPCL compares them


@dataclass
class CrossLabels:
    """Targets of the two branches on the unlabeled images: each a label map (255 = ignored) and a weight."""

    inter_label: torch.Tensor  # (B, H, W): the shared label where the teachers agree (conservative branch 1)
    inter_weight: torch.Tensor  # (B, H, W): mean confidence of the two teachers
    union_label: torch.Tensor  # (B, H, W): every pixel labelled (progressive branch 2)
    union_weight: torch.Tensor  # (B, H, W)


def intersection_union_labels(
    pred_1: torch.Tensor,
    confidence_1: torch.Tensor,
    pred_2: torch.Tensor,
    confidence_2: torch.Tensor,
    rate: torch.Tensor,
    valid: torch.Tensor,
) -> CrossLabels:
    """CPCL's pseudo-labels from the two teachers' hard predictions and confidences (all (B, H, W)).

    Where the teachers agree, both targets are the shared class with weight (w1 + w2) / 2. Where they
    disagree, the intersection ignores the pixel and the union takes the prediction whose class has the
    larger conflict rate `rate` (K,) (the class involved in more disagreements), with that teacher's
    confidence; on a tie branch 2's prediction wins. Pixels that are not `valid` (crop padding) are ignored
    by both.
    """
    agree = pred_1 == pred_2
    mean_confidence = (confidence_1 + confidence_2) / 2
    ignored = torch.full_like(pred_1, IGNORE)
    take_1 = rate[pred_1] > rate[pred_2]
    union_label = torch.where(agree | take_1, pred_1, pred_2)
    union_weight = torch.where(agree, mean_confidence, torch.where(take_1, confidence_1, confidence_2))
    return CrossLabels(
        inter_label=torch.where(agree & valid, pred_1, ignored),
        inter_weight=mean_confidence,
        union_label=torch.where(valid, union_label, ignored),
        union_weight=union_weight,
    )


def global_cross_labels(
    pred_1: torch.Tensor,
    confidence_1: torch.Tensor,
    pred_2: torch.Tensor,
    confidence_2: torch.Tensor,
    valid: torch.Tensor,
    nclass: int,
) -> CrossLabels:
    """`intersection_union_labels` with the conflict rates of the confusion counts summed over all ranks
    (one all_reduce when a process group runs), so that every rank settles disagreements as one process
    holding the global batch would."""
    counts = all_reduce_sum(confusion_counts(pred_1, pred_2, valid, nclass))
    return intersection_union_labels(
        pred_1, confidence_1, pred_2, confidence_2, conflict_rates(counts), valid
    )


def weighted_cross_entropy(
    logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, count_ignored: bool = False
) -> torch.Tensor:
    """sum_p weight(p) CE(z_p, y_p) over labelled pixels, divided by their number (zero if none).

    count_ignored=True (the released code, from CPCL): divided by the number of all pixels, ignored ones
    included, so the intersection loss shrinks with the teachers' disagreement.
    """
    valid = label != IGNORE
    ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE, reduction="none")
    total = (ce * weight).sum()
    return total / (label.numel() if count_ignored else valid.sum().clamp(min=1))


# ------------------------------------------------------------------ aleatoric uncertainty
def _target_nll(log_prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """-log p(y) at every pixel: log-probabilities (B, ..., K, H, W), labels (B, H, W) -> (B, ..., H, W).

    Ignored pixels read class 0: mask them afterwards."""
    safe = torch.where(label != IGNORE, label, torch.zeros_like(label))
    safe = safe.view(label.shape[0], *[1] * (log_prob.dim() - 3), *label.shape[1:])  # (B, 1.., 1, H, W)
    return -log_prob.gather(-3, safe.expand(*log_prob.shape[:-3], *safe.shape[-3:])).squeeze(-3)


class _NoisyTargetNLL(torch.autograd.Function):
    """-log softmax(z + sigma * noise_t)[y] for every sample t, with the gradient written out.

    Autograd's backward allocates four more sample-sized (B, T, K, H, W) tensors (addcmul's alone scales
    the noise by 1 into a new one); this one works in the saved log-probabilities' memory."""

    @staticmethod
    def forward(ctx, logits, sigma, noise, label):
        samples = torch.addcmul(logits.unsqueeze(1), sigma, noise)  # (B, T, K, H, W)
        log_prob = samples.log_softmax(dim=2)
        index = label[:, None, None].expand(-1, noise.shape[1], 1, -1, -1)  # (B, T, 1, H, W)
        ctx.save_for_backward(log_prob, noise, index)
        return -log_prob.gather(2, index).squeeze(2)

    @staticmethod
    def backward(ctx, grad):  # grad (B, T, H, W)
        log_prob, noise, index = ctx.saved_tensors
        # d(-log p_y)/d sample_k = p_k - [k = y], computed in log_prob's memory (not needed again)
        grad_samples = log_prob.exp_().scatter_add_(2, index, log_prob.new_full(index.shape, -1.0))
        grad_samples.mul_(grad.unsqueeze(2))
        grad_logits = grad_samples.sum(dim=1)
        grad_sigma = None
        if ctx.needs_input_grad[1]:
            grad_sigma = grad_samples.mul_(noise).sum(dim=(1, 2), keepdim=True)
        return grad_logits, grad_sigma, None, None


def noisy_target_nll(
    logits: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """The cross-entropy of each logit sample z + sigma * noise_t: logits (B, K, H, W), sigma (B, 1, 1, H, W),
    noise (B, T, K, H, W), label (B, H, W) in [0, K) -> (B, T, H, W). The released term averages these over
    the batch before the ELU; the paper's per-pixel term is heteroscedastic_cross_entropy."""
    return _NoisyTargetNLL.apply(logits.contiguous(), sigma, noise, label)


class _ELU(torch.autograd.Function):
    """F.elu with its forward through exp: CPUs have no vectorised expm1, which makes F.elu's forward
    about ten times slower than an exp. The gradient is 1 above zero and e^x = y + 1 below."""

    @staticmethod
    def forward(ctx, x):
        y = x.clamp(min=0) + x.clamp(max=0).exp() - 1
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (y.clamp(max=0) + 1)


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU with alpha 1: x above zero, e^x - 1 below."""
    return _ELU.apply(x)


class _HeteroscedasticCrossEntropy(torch.autograd.Function):
    """CE0 + CE0 * mean_t(-ELU(CE0 - CE_t)) at every pixel, with its gradients worked out in the forward pass.

    Inputs as heteroscedastic_cross_entropy's. With p0 the softmax of z, p_t that of sample t,
    d_t = CE0 - CE_t and w_t = ELU'(d_t) / T (1/T above zero, e^d_t / T below), the Monte-Carlo mean
    M = mean_t(-ELU(d_t)) has dM/dCE_t = w_t and dM/dCE0 = -sum_t w_t =: s, and CE_t has gradient
    p_t - onehot(y) in the sample's logits, so the value A = CE0 (1 + M) has
        dA/dz     = (1 + M + CE0 s) (p0 - onehot(y)) + CE0 sum_t w_t (p_t - onehot(y))     (B, K, H, W)
        dA/dsigma = CE0 sum_t w_t (sum_k p_tk noise_tk - noise_ty)                          (B, H, W)
    Both sum over the T samples with weights known once the sample's CE_t is, so the forward pass adds them
    up image by image and the backward pass only scales them by the upstream gradient: the (T, K, H, W)
    samples of one image are made, used and dropped while they are in the CPU's cache, and no sample-sized
    tensor is kept for backward. (At CamVid's 64-pixel crops and 11 classes on a CPU, about a third less
    time than autograd through noisy_target_nll and a separate CE0.)
    """

    @staticmethod
    def forward(ctx, logits, sigma, noise, label):
        batch, num_samples, nclass, height, width = noise.shape
        pixels = height * width
        logits, noise = logits.view(batch, nclass, pixels), noise.view(batch, num_samples, nclass * pixels)
        sigma, label = sigma.reshape(batch, 1, 1, pixels), label.reshape(batch, 1, pixels)
        # where each pixel's label class sits in an image's flattened (K * H * W) logits: (B, 1, H * W)
        at_label = label * pixels + torch.arange(pixels, device=label.device)
        clean_prob = logits.log_softmax(dim=1)  # log p0 for now (B, K, H * W)
        ce_clean = clean_prob.view(batch, 1, -1).gather(2, at_label).neg_()  # CE0 (B, 1, H * W)
        with_sigma = ctx.needs_input_grad[1]
        gap = logits.new_empty(batch, num_samples, pixels)  # d_t = CE0 - CE_t
        slope = torch.empty_like(gap)  # T w_t = ELU'(d_t) = e^min(d_t, 0)
        grad_logits = logits.new_empty(batch, nclass, pixels)  # T sum_t w_t p_t, then dA/dz
        grad_sigma = logits.new_empty(batch, pixels)  # T sum_t w_t sum_k p_tk noise_tk, then dA/dsigma
        # One image's samples at a time, so that they stay in cache, in two buffers made once per call
        # (a fresh tensor per image costs a page fault every 4 KiB); per-pixel work after the loop.
        samples = logits.new_empty(num_samples, nclass, pixels)
        log_prob = torch.empty_like(samples)
        for b in range(batch):
            torch.addcmul(logits[b], sigma[b], noise[b].view_as(samples), out=samples)
            torch.log_softmax(samples, dim=1, out=log_prob)
            torch.index_select(log_prob.view(num_samples, -1), 1, at_label[b, 0], out=gap[b]).add_(
                ce_clean[b]
            )
            torch.clamp(gap[b], max=0, out=slope[b]).exp_()
            weighted_prob = log_prob.exp_().mul_(slope[b].unsqueeze(1))  # T w_t p_t (T, K, H * W)
            torch.sum(weighted_prob, dim=0, out=grad_logits[b])
            if with_sigma:
                torch.sum(weighted_prob.mul_(noise[b].view_as(samples)), dim=(0, 1), out=grad_sigma[b])
        mc_mean = (-(gap.clamp(min=0) + slope - 1)).mean(dim=1, keepdim=True)  # M = mean_t(-ELU(d_t))
        weight = slope.div_(num_samples)  # w_t
        weight_sum = weight.sum(dim=1, keepdim=True)  # -s
        # dA/dz: CE0 sum_t w_t (p_t - onehot(y)) + (1 + M - CE0 sum_t w_t) (p0 - onehot(y))
        grad_logits.div_(num_samples).scatter_add_(1, label, -weight_sum).mul_(ce_clean)
        grad_clean = clean_prob.exp_().scatter_add_(1, label, torch.full_like(ce_clean, -1.0))  # p0 - onehot
        grad_logits.addcmul_(grad_clean, 1 + mc_mean - ce_clean * weight_sum)
        if with_sigma:
            noise_at_label = noise.gather(2, at_label.expand(-1, num_samples, -1))  # (B, T, H * W)
            grad_sigma.div_(num_samples).sub_((weight * noise_at_label).sum(dim=1)).mul_(ce_clean[:, 0])
        ctx.save_for_backward(
            grad_logits.view(batch, nclass, height, width), grad_sigma.view(batch, 1, 1, height, width)
        )
        return (ce_clean * (1 + mc_mean)).view(batch, height, width)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad (B, H, W)
        grad_logits, grad_sigma = ctx.saved_tensors
        sigma = grad[:, None, None] * grad_sigma if ctx.needs_input_grad[1] else None
        return grad.unsqueeze(1) * grad_logits, sigma, None, None


def heteroscedastic_cross_entropy(
    logits: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """CE0 + CE0 * mean_t(-ELU(CE0 - CE_t)) at every pixel, CE0 the cross-entropy of the logits and CE_t that
    of sample t, z + sigma * noise_t: logits (B, K, H, W), sigma (B, 1, 1, H, W), noise (B, T, K, H, W),
    label (B, H, W) in [0, K). Returns (B, H, W), with gradients to logits and sigma: the values of
    ce0 + ce0 * (-elu(ce0.unsqueeze(1) - noisy_target_nll(...))).mean(dim=1) without their autograd graph."""
    return _HeteroscedasticCrossEntropy.apply(logits.contiguous(), sigma, noise.contiguous(), label)


def aleatoric_loss(
    logits: torch.Tensor,
    variance: torch.Tensor,
    label: torch.Tensor,
    noise: torch.Tensor,
    released: bool = False,
) -> torch.Tensor:
    """Heteroscedastic ("Bayesian") cross-entropy over T Monte-Carlo logit samples, plus a variance depressor.

    noise: (B, T, K, H, W) standard normal draws; the samples are z + sigma * noise with sigma = sqrt(v),
    all T at once. With CE0 the cross-entropy of z and CE_t that of sample t,
        AL = CE0 + CE0 * mean_t(-ELU(CE0 - CE_t)) + (exp(v) - 1):
    a sample that fits better than z lowers the loss, one that fits worse raises it by less than CE0, and
    the depressor keeps the variance from growing without bound.

    Paper (default): per pixel, averaged over the labelled pixels (depressor included); the noise is
    reparameterised, so the gradient reaches the variance through the samples.
    released=True: CE0 and CE_t are batch means over the labelled pixels, the depressor a mean over all
    pixels, and the samples carry no gradient to the variance (Normal.sample()): the variance only feels
    the depressor.
    """
    logits, variance = logits.float(), variance.float()
    valid = label != IGNORE
    num_valid = valid.sum().clamp(min=1)
    # T next to K: the variance's gradient sums over adjacent dimensions (the loss runs ~25% faster on a CPU)
    sigma = (variance + 1e-15).sqrt().unsqueeze(1)  # (B, 1, 1, H, W), shared by the T samples and K classes
    if released:
        sigma = sigma.detach()
    safe_label = torch.where(valid, label, 0)
    depressor = variance.squeeze(1).exp() - 1  # (B, H, W)
    if released:
        ce_clean = _target_nll(logits.log_softmax(dim=1), label)  # (B, H, W)
        ce_noisy = noisy_target_nll(logits, sigma, noise, safe_label)  # (B, T, H, W)
        ce0 = (ce_clean * valid).sum() / num_valid
        ce_t = (ce_noisy * valid.unsqueeze(1)).sum(dim=(0, 2, 3)) / num_valid  # (T,)
        return ce0 + ce0 * (-elu(ce0 - ce_t)).mean() + depressor.mean()
    per_pixel = heteroscedastic_cross_entropy(logits, sigma, noise, safe_label) + depressor
    return (per_pixel * valid).sum() / num_valid


# ------------------------------------------------------------------ energy
def energy_loss(logits: torch.Tensor, label: torch.Tensor, released: bool = False) -> torch.Tensor:
    """Energy term on the labelled pixels; zero when there are none.

    Paper (released=False), our reading of the figure's "Logits -> LogSumExp": the mean free energy
    -log sum_k exp(z_pk) of the logits over the labelled pixels. It has no lower bound (raising all logits
    together lowers it), which is why DUEB.py uses the released term by default.
    released=True: log sum_p exp(s_p) over all labelled pixels of the batch, with s_p = softmax(z_p)[y_p]
    and pixels with s_p == 0 left out (a penalty on the target probability, plus log N). The released
    code returns -inf when no pixel is labelled; here that case gives 0.
    """
    logits = logits.float()
    valid = label != IGNORE
    if not released:
        free_energy = -logits.logsumexp(dim=1)
        return (free_energy * valid).sum() / valid.sum().clamp(min=1)
    target_prob = (-_target_nll(logits.log_softmax(dim=1), label)).exp()
    selected = valid & (target_prob != 0)
    any_selected = selected.any()
    # Unselected pixels: -inf, or 0 when nothing is selected so that logsumexp and its gradient stay
    # finite (its value is then discarded).
    filler = torch.where(any_selected, -torch.inf, 0.0)
    values = torch.where(selected, target_prob, filler)
    return torch.where(any_selected, values.logsumexp(dim=(0, 1, 2)), 0.0)
