"""What runs on the device, and how: the networks (DDP, SyncBN, channels_last, torch.compile), the batches,
and the autocast dtype."""

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.semseg.deeplabv3plus import use_channels_last
from util.dist import DistInfo
from util.engine.method import Networks

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# DDP must not broadcast buffers at every forward: each CPU rank keeps its own BatchNorm statistics, which the
# engine averages before evaluating and saving. Newer torch names the switch forward_sync_buffers (it still
# copies rank 0's buffers once at the start, the same on every rank there) and warns about the old name.
NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of config key `amp`; 'auto' is bf16 on a GPU that has it, fp16 (with a
    GradScaler) on an older GPU, and float32 (no autocast) on a CPU."""
    if amp != "auto":
        return AMP_DTYPES[amp]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def to_device(batch, device, non_blocking: bool = True):
    """The tensors of a (nested) batch on `device`; asynchronous copies unless `non_blocking` is False
    (a copy to the CPU that is read at once)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


def wrap_networks(networks: Networks, cfg: dict, dist: DistInfo) -> dict[str, nn.Module]:
    """Every network on the device (in `networks` itself, SyncBN-converted on CUDA when distributed), frozen
    ones without gradient; returns {name: the module the method calls}: DDP around the trained ones when
    distributed, everything compiled when the config asks. Weights are still read from `networks`."""
    device = dist.device
    sync_bn = dist.distributed and device.type == "cuda"
    for group in (networks.trained, networks.frozen):
        for name, net in group.items():
            net = net.to(device)
            if cfg["channels_last"]:
                use_channels_last(net, device)
            # SyncBN needs CUDA; it makes per-GPU batches of 2-4 behave like the global batch.
            group[name] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_bn else net
    for net in networks.frozen.values():
        net.requires_grad_(False)
    wrapped = dict(networks.all)
    if dist.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        for name, net in networks.trained.items():
            wrapped[name] = DistributedDataParallel(net, device_ids=device_ids, **NO_BUFFER_BROADCAST)
    if cfg["compile"]:
        wrapped = {name: torch.compile(net) for name, net in wrapped.items()}
    return wrapped
