"""Two-rank pseudo-labels for tests/test_dueb.py: each rank holds its own teachers' predictions, and the
disagreements must be settled with the conflict rates of the two ranks' batches together."""

import os

import torch

from util.losses.dueb import global_cross_labels

NCLASS = 4


def rank_data(rank: int):
    """Rank 0's teachers mostly confuse classes 0 and 1, rank 1's classes 2 and 3."""
    g = torch.Generator().manual_seed(20 + rank)
    shape = (2, 3, 5)
    pred_1 = torch.randint(2 * rank, 2 * rank + 2, shape, generator=g)
    pred_2 = torch.where(
        torch.rand(shape, generator=g) < 0.3, pred_1, torch.randint(0, NCLASS, shape, generator=g)
    )
    confidence_1, confidence_2 = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
    valid = torch.rand(shape, generator=g) > 0.1
    return pred_1, confidence_1, pred_2, confidence_2, valid


def worker(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        labels = global_cross_labels(*rank_data(rank), NCLASS)
        torch.save(vars(labels), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
