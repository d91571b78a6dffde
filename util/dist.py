"""Process group set-up from torchrun's environment variables; a plain `python script.py` is one process.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; there is no `--local_rank`
argument. Without them we run as a single process and create no process group, so a laptop without a
GPU needs no launcher. Under `torchrun --max-restarts=N` the restarted workers find each other again
(see init_distributed) and the training resumes from its last checkpoint.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group if torchrun launched us: nccl on GPUs, gloo on CPUs."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend, device_id = ("nccl", dev) if use_cuda else ("gloo", None)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            # torchrun shares its rendezvous store with the workers and keeps it across restarts, so
            # after `--max-restarts` the new workers would read the addresses the dead ones left there
            # and fail to connect ("Connection refused"; pytorch/pytorch#135712). Keys under a prefix
            # per attempt keep each attempt to itself, as torch did itself before it shared the store.
            store, _, _ = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"semiseg/attempt_{attempt}", store)
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, device_id=device_id
            )
    return DistInfo(rank, local_rank, world_size, dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank (e.g. an error message or a path)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """A picklable object from every rank, in rank order (e.g. each rank's random states)."""
    objects = [None] * get_world_size()
    if is_dist():
        dist.all_gather_object(objects, obj)
    else:
        objects[0] = obj
    return objects


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
