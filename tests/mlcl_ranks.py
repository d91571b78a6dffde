"""Two-rank prototype memory update for tests/test_mlcl.py, in a module light enough to import quickly in
the spawned processes (torch and util.losses.mlcl only)."""

import os

import torch

from util.losses.mlcl import PrototypeMemory


def rank_data(rank: int):
    """Rank 0 sees classes 0 and 2, rank 1 classes 0 and 1 (more pixels); class 3 nowhere."""
    g = torch.Generator().manual_seed(10 + rank)
    n = 6 + 4 * rank
    features = torch.rand(n, 3, generator=g)
    labels = torch.tensor(([0, 2] if rank == 0 else [0, 1]) * (n // 2))
    return features, labels, torch.ones(n, dtype=torch.bool)


def start_memory():
    """Class 0 initialised, the others not: the state every rank starts from."""
    memory = torch.zeros(4, 3)
    memory[0] = torch.tensor([0.5, 0.2, 0.1])
    return memory, torch.tensor([True, False, False, False])


def worker(rank: int, store: str, out: str) -> None:
    """One EMA step of each variant under a real gloo process group; each rank saves what it ends with."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        for released in (False, True):
            bank = PrototypeMemory(4, 3)
            bank.memory, bank.initialised = start_memory()
            bank.update(*rank_data(rank), 0.9, released)
            torch.save(bank.state_dict(), os.path.join(out, f"rank{rank}_released{released}.pt"))
    finally:
        torch.distributed.destroy_process_group()
