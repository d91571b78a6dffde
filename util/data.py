"""Data loaders whose order and augmentations are a pure function of (seed, epoch, position).

Each training sample is drawn together with its own random seed, and the dataset re-seeds Python's and
torch's RNGs with it before augmenting. So the stream does not depend on the number of loader workers,
and a run restarted in the middle of an epoch sees exactly the samples an uninterrupted run would have.
"""

import hashlib
import random

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from dataset.semi import TRUTH, SemiDataset
from util.dist import get_rank, get_world_size
from util.metrics import ShardSampler


def _mix(*parts) -> int:
    """A 63-bit integer that depends on every part (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampler(Sampler):
    """DistributedSampler-like: shuffled per epoch, split across ranks, full batches only.

    Yields (index, sample_seed) pairs. Every rank draws the same permutation, keeps a contiguous share of
    whole batches (drop_last), and starts at `start_batch` when resuming inside an epoch.
    `order_seed` decides the permutation and `aug_seed` the augmentations, so two loaders can go
    through the same images in the same order with independent augmentations (UniMatch's mix stream).
    """

    def __init__(
        self, num_samples: int, batch_size: int, order_seed: int, aug_seed: int, shuffle: bool = True
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.order_seed = order_seed
        self.aug_seed = aug_seed
        self.shuffle = shuffle
        self.rank, self.world_size = get_rank(), get_world_size()
        self.epoch = 0
        self.start_batch = 0
        per_rank = num_samples // self.world_size
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} on each of {self.world_size} "
                "process(es); lower batch_size or use more data"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.order_seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        # Rank r takes positions r, r + world, r + 2*world, ... as DistributedSampler does.
        positions = list(
            range(self.rank, self.world_size * self.batches_per_epoch * self.batch_size, self.world_size)
        )
        positions = positions[self.start_batch * self.batch_size :]
        epoch_seed = _mix(self.aug_seed, self.epoch)
        for pos in positions:
            yield order[pos], (epoch_seed + pos) % (2**63)


class SeededDataset(Dataset):
    """Wraps a dataset so that __getitem__((index, seed)) augments with RNGs seeded by `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        in_main_process = get_worker_info() is None
        if in_main_process:  # num_workers=0: keep the training RNG (dropout, ...) untouched
            saved = random.getstate(), torch.get_rng_state()
        random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA streams stay as they are
        try:
            return self.dataset[index]
        finally:
            if in_main_process:
                random.setstate(saved[0])
                torch.set_rng_state(saved[1])


def train_loader(
    dataset,
    batch_size: int,
    order_seed: int,
    aug_seed: int,
    num_workers: int,
    pin_memory: bool,
    worker_init=None,
):
    sampler = SeededSampler(len(dataset), batch_size, order_seed, aug_seed)
    loader = DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,  # page-locked batches: the copy to the GPU runs asynchronously
        persistent_workers=num_workers > 0,  # workers live across epochs: no restart at each epoch
        drop_last=True,
        worker_init_fn=worker_init,
        # Its own generator: creating an iterator draws a worker seed, which must not move the global
        # RNG (that would shift dropout masks after a resume). Samples are re-seeded anyway.
        generator=torch.Generator(),
    )
    return loader, sampler


def validation_loader(cfg: dict, pin_memory: bool, worker_init=None) -> DataLoader:
    """The validation images one at a time, each rank its own share (ShardSampler)."""
    common = dict(nclass=cfg["nclass"], allow_outside_root=cfg["allow_outside_data_root"])
    val = SemiDataset(cfg["data_root"], "val", cfg["val_id_path"], **common)
    return DataLoader(
        val,
        batch_size=1,
        sampler=ShardSampler(val),
        num_workers=min(cfg["num_workers"], 2),
        pin_memory=pin_memory,
        persistent_workers=cfg["num_workers"] > 0,  # no restart at each evaluation
        worker_init_fn=worker_init,
        generator=torch.Generator(),  # keeps the global RNG where training left it
    )


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


class TrainingData:
    """The training streams (labeled; unlabeled and mix when a method uses them) and the validation loader.

    `batches(epoch, start_batch)` yields {'labeled': ..., 'unlabeled': ..., 'mix': ...} for one epoch from
    `start_batch` on, the same batches an uninterrupted run sees there. When the unlabeled split lists masks
    (and `pseudo_label_quality` is on), the batch also holds 'truth': {'unlabeled': ..., 'mix': ...}, each
    stream's masks cropped like its weak images (B, S, S), for measuring pseudo-labels only
    (util/pseudo_labels.py); the streams themselves are the same as without it.
    """

    truth = False  # whether the unlabeled samples carry their masks (subclasses with other streams: no)

    def __init__(
        self,
        cfg: dict,
        uses_unlabeled: bool,
        pin_memory: bool,
        worker_init=None,
        wrap_unlabeled=None,
        uses_mix: bool = True,
        cutmix: str = "unimatch",
        mix_partner: str | None = None,
    ):
        """`worker_init`: every loader worker's `worker_init_fn` (the engine's makes them ignore Ctrl-C).
        `wrap_unlabeled(dataset) -> dataset`, when given, wraps the unlabeled stream's dataset (not the mix
        stream's), e.g. to add items to each sample. `cutmix`: the boxes' style (dataset.semi.CUTMIX_BOXES);
        `mix_partner`: 'same_image' or 'other_image' (default: the config's)."""
        root, crop, bs, workers, seed = (
            cfg["data_root"], cfg["crop_size"], cfg["batch_size"], cfg["num_workers"], cfg["seed"],
        )  # fmt: skip
        common = dict(nclass=cfg["nclass"], allow_outside_root=cfg["allow_outside_data_root"])
        # The labeled list is repeated to the length of the unlabeled one (as in UniMatch), so an epoch is
        # one pass over the unlabeled images for every method, the supervised baseline included.
        num_unlabeled = count_lines(cfg["unlabeled_id_path"]) if cfg["unlabeled_id_path"] else None
        labeled = SemiDataset(
            root, "train_l", cfg["labeled_id_path"], crop_size=crop, nsample=num_unlabeled, **common
        )
        loaders = dict(num_workers=workers, pin_memory=pin_memory, worker_init=worker_init)
        loader_l, sampler_l = train_loader(labeled, bs, seed, _mix(seed, "labeled"), **loaders)
        self.loaders, self.samplers = [loader_l], [sampler_l]
        if uses_unlabeled:
            unlabeled = SemiDataset(
                root, "train_u", cfg["unlabeled_id_path"], crop_size=crop, truth=cfg["pseudo_label_quality"],
                cutmix=cutmix, **common,
            )  # fmt: skip
            self.truth = unlabeled.truth
            # The mix stream goes through the same images in the same order with other augmentations
            # (UniMatch as released), or through another order ('other_image').
            mix_partner = mix_partner or cfg["mix_partner"]
            mix_order = seed if mix_partner == "same_image" else _mix(seed, "mix-order")
            unlabeled_stream = wrap_unlabeled(unlabeled) if wrap_unlabeled else unlabeled
            loader_u, sampler_u = train_loader(unlabeled_stream, bs, seed, _mix(seed, "unlabeled"), **loaders)
            self.loaders.append(loader_u)
            self.samplers.append(sampler_u)
            if uses_mix:  # its own seeds: leaving it out changes no other stream's batches
                loader_m, sampler_m = train_loader(unlabeled, bs, mix_order, _mix(seed, "mix"), **loaders)
                self.loaders.append(loader_m)
                self.samplers.append(sampler_m)
        self.iters_per_epoch = min(s.batches_per_epoch for s in self.samplers)
        self.val_loader = validation_loader(cfg, pin_memory, worker_init)

    def batches(self, epoch: int, start_batch: int = 0):
        for sampler in self.samplers:
            sampler.set_epoch(epoch, start_batch)
        for parts in zip(*self.loaders):
            batch = dict(zip(("labeled", "unlabeled", "mix"), parts))
            if self.truth:
                truth = {}
                for stream in ("unlabeled", "mix"):
                    if stream in batch:
                        items = list(batch[stream])
                        truth[stream] = items.pop(TRUTH)
                        batch[stream] = items
                batch["truth"] = truth
            yield batch
