"""How good are the pseudo-labels a method trains on? Measured against masks the unlabeled images happen to
have (every benchmark's unlabeled split lists them), never used for training.

A method records each target its unlabeled losses read, after thresholds, mixing and weights:
`PseudoLabelMeter.add(name, pseudo_label, weight, truth)`, with `truth` the unlabeled images' masks
carried through the same augmentation and mixing (None when the split has no masks: nothing is counted).
The meter keeps, per named stream, a weighted confusion matrix on the device (no host sync per step), over
two windows: since the last log step and since the last evaluation. `take(window)` reads and restarts one.

For a stream over a window:
    accuracy  share of the trained-on weight that sits on the right class (%), pixels with a mask only
    miou      IoU of the weighted pseudo-labels against the masks, averaged over the classes that occur
              in the window (in the masks or the pseudo-labels)
    used      share of the pixels with a mask that carry a weight above 0 (%)
"""

from dataclasses import dataclass

import torch

from util.dist import all_reduce_sum
from util.losses import IGNORE

WINDOWS = ("log", "eval")


@dataclass
class Quality:
    accuracy: float  # %
    miou: float  # %
    used: float  # %

    def __str__(self) -> str:
        return f"acc {self.accuracy:.1f} mIoU {self.miou:.1f} used {self.used:.1f}%"


def quality_from_counts(counts: torch.Tensor, nclass: int) -> Quality | None:
    """`counts` (K * K + 2,): the weighted confusion matrix (rows: mask, columns: pseudo-label), then the
    pixels with a mask that carry weight and those with a mask. None when no pixel had a mask."""
    confusion = counts[: nclass * nclass].view(nclass, nclass)
    used_pixels, masked_pixels = counts[-2].item(), counts[-1].item()
    if masked_pixels == 0:
        return None
    total = confusion.sum().item()
    right = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - right
    occurs = union > 0
    accuracy = 100.0 * right.sum().item() / total if total > 0 else 0.0
    miou = 100.0 * (right[occurs] / union[occurs]).mean().item() if occurs.any() else 0.0
    return Quality(accuracy, miou, 100.0 * used_pixels / masked_pixels)


def pseudo_label_counts(
    pseudo_label: torch.Tensor, weight: torch.Tensor, truth: torch.Tensor, nclass: int
) -> torch.Tensor:
    """The (K * K + 2,) float64 counts of one target: pseudo_label (B, H, W) long (IGNORE: not trained
    on), weight broadcastable to it (0: not trained on), truth (B, H, W) long (IGNORE: no mask there)."""
    weight = torch.broadcast_to(torch.as_tensor(weight, device=pseudo_label.device), pseudo_label.shape)
    weight = weight.detach().double() * (pseudo_label != IGNORE)
    masked = truth != IGNORE
    weight = weight * masked
    # one scatter into K*K bins; pixels without a mask or weight add 0 to bin 0
    index = (truth.clamp(max=nclass - 1) * nclass + pseudo_label.clamp(max=nclass - 1)).flatten()
    counts = torch.zeros(nclass * nclass + 2, dtype=torch.float64, device=pseudo_label.device)
    counts[: nclass * nclass].scatter_add_(0, index, weight.flatten())
    counts[-2] = (weight > 0).sum()
    counts[-1] = masked.sum()
    return counts


class PseudoLabelMeter:
    """Per-stream weighted confusion matrices of a method's pseudo-labels against the unlabeled masks."""

    def __init__(self, nclass: int):
        self.nclass = nclass
        self.counts: dict[str, dict[str, torch.Tensor]] = {window: {} for window in WINDOWS}

    def add(self, name: str, pseudo_label: torch.Tensor, weight, truth: torch.Tensor | None) -> None:
        """Count one target of stream `name`; nothing when the images have no masks (`truth` None)."""
        if truth is None:
            return
        counts = pseudo_label_counts(pseudo_label, weight, truth, self.nclass)
        for window in self.counts.values():
            window[name] = window[name] + counts if name in window else counts

    def take(self, window: str) -> dict[str, Quality]:
        """The quality of every stream over `window` ('log' or 'eval'), summed over the processes (a
        collective: every rank calls it at the same step); the window starts again."""
        streams, self.counts[window] = self.counts[window], {}
        if not streams:
            return {}
        totals = all_reduce_sum(torch.stack(list(streams.values())))
        found = {name: quality_from_counts(c, self.nclass) for name, c in zip(streams, totals.cpu())}
        return {name: quality for name, quality in found.items() if quality is not None}
