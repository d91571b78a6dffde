"""Two-rank memory-bank update for tests/test_ctt.py, in a module light enough to import quickly in the
spawned processes (torch and util.losses.ctt only)."""

import os

import torch

from util.losses.ctt import ClassQueue, gather_from_ranks


def rank_candidates(rank: int):
    """Per-class candidates (K=3, m=2, D=4) of one rank: rank 0 has one for class 0 and two for class 2,
    rank 1 two for class 0 and one for class 1 (in the second slot, to test the compaction)."""
    g = torch.Generator().manual_seed(20 + rank)
    features = torch.rand(3, 2, 4, generator=g)
    chosen = torch.tensor([[True, False], [False, False], [True, True]])
    if rank == 1:
        chosen = torch.tensor([[True, True], [False, True], [False, False]])
    return features, chosen


def worker(rank: int, store: str, out: str) -> None:
    """Gather both ranks' candidates and push them into a queue of 4 slots that already holds 2 entries
    per class; each rank saves the queue it ends with."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        queue = ClassQueue.empty(3, 4, 4)
        queue.push(torch.ones(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))
        queue.push(*gather_from_ranks(*rank_candidates(rank)))
        torch.save(queue.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
