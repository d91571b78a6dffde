"""The training loop, written once for every method.

A method script defines a `Method` subclass whose `step(batch)` returns its weighted loss terms; the
engine owns everything that is the same for all methods: process group, seeds, loaders, DDP, optimizer,
poly schedule, autocast, checkpoints, logging and evaluation.

Faults it survives (README, "Fault tolerance"): a killed process resumes bit-identically from
latest.pth (or previous.pth when latest.pth is damaged); a step with a non-finite loss or gradient is
skipped on every rank alike and a run of them stops the run; a checkpoint that cannot be written is
reported and retried at the next save while the last good one stays in place.
"""

import argparse
import logging
import os
import random
import sys
import time

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from dataset.semi import DataError, SemiDataset
from model import build_model
from util import checkpoint as ckpt
from util.config import ConfigError, check_paths, load_config
from util.data import _mix, train_loader
from util.dist import barrier, broadcast_object, cleanup, init_distributed, is_dist
from util.losses import build_labeled_criterion
from util.metrics import ShardSampler, evaluate

logger = logging.getLogger("semiseg")

# Exit status of a method script for each kind of fault (README, "Fault tolerance").
EXIT_BAD_INPUT = 2  # config, data file or checkpoint: fix the input; nothing to resume would help
EXIT_NONFINITE = 3  # a run of non-finite steps; latest.pth holds the last good state
EXIT_SAVE_FAILED = 4  # the final checkpoint could not be written; latest.pth holds the last good one


class NonFiniteError(FloatingPointError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class Method:
    """One semi-supervised method: its training step and whatever state it carries.

    `step(batch)` gets a dict with 'labeled' = (img_x, mask_x) and, when `uses_unlabeled`, 'unlabeled'
    and 'mix' = (img_w, img_s1, img_s2, ignore_mask, cutmix_box1, cutmix_box2), all on the device. It
    returns ({name: weighted loss term}, {name: float statistic to log}); the engine sums the terms.
    The engine keeps `iteration` (the step about to run, from 0) and `total_iters` up to date, for methods
    whose weights follow a schedule.
    """

    uses_unlabeled = True

    def __init__(self, model: torch.nn.Module, cfg: dict, criterion_l):
        self.model = model  # DDP-wrapped when distributed
        self.cfg = cfg
        self.criterion_l = criterion_l
        self.iteration = 0
        self.total_iters = 1

    def step(self, batch: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Tensors the method carries between steps (teachers, memories); saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} carries no state, but the checkpoint has {sorted(state)}"
            )


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def poly_lr(base_lr: float, iteration: int, total_iters: int, power: float) -> float:
    """UniMatch's poly schedule: it updates the lr after each optimizer step, so step 0 uses the base lr
    and step t >= 1 uses base * (1 - (t - 1) / total) ** power."""
    if iteration == 0:
        return base_lr
    return base_lr * (1 - (iteration - 1) / total_iters) ** power


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        # As plain values: weights_only loading accepts tensors and lists, not numpy arrays.
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _clone_tensors(state):
    """A copy of a (nested) state dict whose tensors do not share memory with the originals."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone_tensors(v) for v in state)
    return state


def _as_tuple(value):
    # Python's random state is a nested tuple; keep it one after a round trip through a checkpoint.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def setup_logging(save_path: str | None, is_main: bool) -> None:
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if save_path is not None and is_main:
        handlers.append(logging.FileHandler(os.path.join(save_path, "train.log")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)


def prepare_save_path(save_path: str) -> None:
    """Create the output folder and prove it is writable before any training happens."""
    try:
        os.makedirs(save_path, exist_ok=True)
        probe = os.path.join(save_path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"cannot write to save path {save_path}: {err.strerror or err}") from err


def prepare_demo_data(cfg: dict) -> None:
    """The demo dataset is generated on first use (by rank 0, while the others wait)."""
    if cfg["dataset"] == "demo":
        from dataset.demo import ensure_demo

        ensure_demo(cfg["data_root"], **cfg["demo"])


class Trainer:
    def __init__(self, method_cls, cfg: dict, save_path: str | None, source: str = "config"):
        self.dist = init_distributed()
        self.cfg = cfg
        self.save_path = save_path
        self.device = self.dist.device
        # Rank 0 prepares the output folder and the demo data; every rank stops on its error, or the
        # others would wait forever at the next collective.
        error = None
        if self.dist.is_main:
            try:
                if save_path is not None:
                    prepare_save_path(save_path)
                prepare_demo_data(cfg)
            except (ConfigError, OSError, ValueError) as err:
                error = str(err)
        error = broadcast_object(error)
        if error:
            raise ConfigError(error)
        check_paths(cfg, source, need_unlabeled=method_cls.uses_unlabeled)
        setup_logging(save_path, self.dist.is_main)
        seed_everything(cfg["seed"] + self.dist.rank, cfg["deterministic"])

        model = build_model(cfg).to(self.device)
        if self.dist.distributed and self.device.type == "cuda":
            # SyncBN needs CUDA; it makes per-GPU batches of 2-4 behave like the global batch.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model_without_ddp = model
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        else:
            self.model = model

        self.optimizer = torch.optim.SGD(
            [
                {"params": model.backbone_parameters(), "lr": cfg["lr"]},
                {"params": model.head_parameters(), "lr": cfg["lr"] * cfg["lr_multi"]},
            ],
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
        )
        self.amp_dtype = AMP_DTYPES[cfg["amp"]]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["amp"] == "fp16")
        self.method = method_cls(self.model, cfg, build_labeled_criterion(cfg))

        self._build_loaders(method_cls.uses_unlabeled)
        if cfg["max_iters"] is not None:
            self.total_iters = cfg["max_iters"]
        else:
            self.total_iters = cfg["epochs"] * self.iters_per_epoch
        self.method.total_iters = self.total_iters
        self.iteration = 0
        self.best_miou = -1.0  # the first evaluation always writes best.pth
        self.best_iteration = 0
        self.writer = None

        # Non-finite guard: the gradients it checks, and a copy of the buffers (BatchNorm running
        # statistics) taken before each forward, put back when a step is skipped.
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._buffers = [b for b in model.buffers()]
        self._buffer_backup = [b.detach().clone() for b in self._buffers]
        self.nonfinite_steps = 0  # skipped steps in all (saved in checkpoints)
        self.nonfinite_streak = 0  # skipped steps in a row, ending at the last step
        self.nonfinite_first = None  # iteration where the current streak began
        self.nonfinite_last = ""  # what was non-finite at the last skipped step
        self.scaler_skips = 0  # fp16 steps the GradScaler skipped for an overflow (its normal business)
        self.saved_iteration = None  # iteration of the latest.pth on disk, when known
        self.failed_saves = {}  # file name -> OS error of its last save, while it failed

    # ------------------------------------------------------------------ data
    def _build_loaders(self, uses_unlabeled: bool) -> None:
        cfg, pin = self.cfg, self.device.type == "cuda"
        common = dict(nclass=cfg["nclass"], allow_outside_root=cfg["allow_outside_data_root"])
        root, crop, bs, workers, seed = (
            cfg["data_root"],
            cfg["crop_size"],
            cfg["batch_size"],
            cfg["num_workers"],
            cfg["seed"],
        )
        # The labeled list is repeated to the length of the unlabeled one (as in UniMatch), so an epoch is
        # one pass over the unlabeled images for every method, the supervised baseline included.
        num_unlabeled = count_lines(cfg["unlabeled_id_path"]) if cfg["unlabeled_id_path"] else None
        labeled = SemiDataset(
            root, "train_l", cfg["labeled_id_path"], crop_size=crop, nsample=num_unlabeled, **common
        )
        loader_l, sampler_l = train_loader(labeled, bs, seed, _mix(seed, "labeled"), workers, pin)
        self.loaders, self.samplers = [loader_l], [sampler_l]
        if uses_unlabeled:
            unlabeled = SemiDataset(root, "train_u", cfg["unlabeled_id_path"], crop_size=crop, **common)
            # The mix stream goes through the same images in the same order with other augmentations
            # (UniMatch as released), or through another order ('other_image').
            mix_order = seed if cfg["mix_partner"] == "same_image" else _mix(seed, "mix-order")
            loader_u, sampler_u = train_loader(unlabeled, bs, seed, _mix(seed, "unlabeled"), workers, pin)
            loader_m, sampler_m = train_loader(unlabeled, bs, mix_order, _mix(seed, "mix"), workers, pin)
            self.loaders += [loader_u, loader_m]
            self.samplers += [sampler_u, sampler_m]
        self.iters_per_epoch = min(s.batches_per_epoch for s in self.samplers)
        val = SemiDataset(root, "val", cfg["val_id_path"], **common)
        self.val_loader = torch.utils.data.DataLoader(
            val,
            batch_size=1,
            sampler=ShardSampler(val),
            num_workers=min(workers, 2),
            pin_memory=pin,
            generator=torch.Generator(),  # keeps the global RNG where training left it
        )

    def _batches(self, epoch: int, start_batch: int):
        for s in self.samplers:
            s.set_epoch(epoch, start_batch)
        names = ("labeled", "unlabeled", "mix")
        for parts in zip(*self.loaders):
            yield dict(zip(names, parts))

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict) -> tuple[float, dict, dict]:
        batch = to_device(batch, self.device)
        lr = poly_lr(self.cfg["lr"], self.iteration, self.total_iters, self.cfg["poly_power"])
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.param_groups[1]["lr"] = lr * self.cfg["lr_multi"]
        self.method.iteration = self.iteration
        if self._buffers:
            torch._foreach_copy_(self._buffer_backup, self._buffers)
        # What the method carries (a prototype memory, a teacher) may change inside its step: keep a copy
        # to put back if the step is skipped, so a NaN never reaches it.
        self._method_backup = _clone_tensors(self.method.state_dict())
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses, stats = self.method.step(batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # every rank runs backward, even on a NaN: DDP needs it

        names = list(losses)
        values = torch.stack([v.detach().float().reshape(()) for v in (*losses.values(), loss)])
        flags = self._nonfinite_flags(values)
        numbers = torch.cat((values, flags.flatten())).tolist()  # the step's one host sync
        width = len(values)  # the terms, then their sum
        flat = numbers[width:]
        rows = [flat[r * (width + 1) : (r + 1) * (width + 1)] for r in range(self.dist.world_size)]
        grad_bad = any(row[0] for row in rows) and self._gradients_nonfinite()
        bad_terms = {
            (*names, "total")[j]: [r for r, row in enumerate(rows) if row[1 + j]]
            for j in range(width)
            if any(row[1 + j] for row in rows)
        }
        if len(bad_terms) > 1:  # the sum is non-finite because a term is: name the term
            bad_terms.pop("total", None)
        if not grad_bad and not bad_terms:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.nonfinite_streak = 0
        elif not bad_terms and self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0:
            # fp16 gradient overflow with a finite loss: the GradScaler skips the step and lowers the
            # scale, as it always does. Only once the scale is below 1 is it counted as a fault.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scaler_skips += 1
        else:
            self._skip_step(grad_bad, bad_terms)
        terms = dict(zip(names, numbers[: width - 1]))
        return numbers[width - 1], terms, stats

    def _nonfinite_flags(self, values: torch.Tensor) -> torch.Tensor:
        """(world_size, 1 + len(values)) 0/1 flags: gradients, then each loss value, per rank.

        The L2 norms of all gradients in one fused kernel (NaN and Inf make them non-finite; so does a
        norm beyond float32's range, which _gradients_nonfinite then tells apart), and one all_reduce
        so that every rank sees every rank's flags and they all take the same decision.
        """
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_bad = torch.zeros((), device=values.device)
        if grads:
            norms = torch.stack(torch._foreach_norm(grads, 2))
            grad_bad = (~torch.isfinite(norms)).any().float()
        own = torch.cat((grad_bad.reshape(1), (~torch.isfinite(values)).float()))
        flags = torch.zeros(self.dist.world_size, own.numel(), device=values.device)
        flags[self.dist.rank] = own
        if is_dist():
            torch.distributed.all_reduce(flags)
        return flags

    def _gradients_nonfinite(self) -> bool:
        """The exact test, run only when the norms overflowed: does any gradient hold a NaN or an Inf?

        Gradients are identical on every rank after DDP's all-reduce, so every rank gets the same
        answer without talking to the others. (The inf-norm would be exact at once, but on CPUs it is
        ten times slower than the L2 norm.)
        """
        return any(not torch.isfinite(p.grad).all() for p in self._params if p.grad is not None)

    def _skip_step(self, grad_bad: bool, bad_terms: dict) -> None:
        """Leave weights, optimizer state and BatchNorm statistics as they were before this step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._buffer_backup)
        self.method.load_state_dict(self._method_backup)
        parts = [
            f"loss term '{name}' on rank {', '.join(map(str, ranks))}" for name, ranks in bad_terms.items()
        ]
        if grad_bad:
            parts.append("gradients")
        self.nonfinite_last = " and ".join(parts)
        if self.nonfinite_streak == 0:
            self.nonfinite_first = self.iteration
        self.nonfinite_streak += 1
        self.nonfinite_steps += 1
        if self.dist.is_main:  # every rank knows the same: one message
            logger.warning(
                f"iteration {self.iteration}: non-finite {self.nonfinite_last}; optimizer step skipped "
                f"({self.nonfinite_streak} in a row, {self.nonfinite_steps} in all)"
            )

    def _nonfinite_message(self) -> str:
        where = os.path.join(self.save_path, "latest.pth") if self.save_path else None
        kept = ""
        if where and self.saved_iteration is not None:
            kept = f" {where} (iteration {self.saved_iteration}) holds the last good state and was kept."
        return (
            f"stopped: {self.nonfinite_streak} optimizer steps in a row had non-finite values "
            f"(iterations {self.nonfinite_first} to {self.iteration - 1}; at iteration {self.iteration - 1}: "
            f"{self.nonfinite_last}). The weights are those from before iteration {self.nonfinite_first}."
            f"{kept} Lower lr, try amp=none or check the data; max_nonfinite_steps "
            f"(now {self.cfg['max_nonfinite_steps']}) sets how many in a row are tolerated."
        )

    # ------------------------------------------------------------------ evaluation
    def sync_batchnorm_stats(self) -> None:
        """Average BN running statistics over ranks where SyncBN does not apply (CPU processes).

        Parameters stay identical under DDP, but each rank's running mean/var follow its own batches;
        averaging them before evaluating or saving keeps every rank's model the same.
        """
        if not is_dist() or self.device.type == "cuda":
            return
        world = self.dist.world_size
        for module in self.model_without_ddp.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                for buf in (module.running_mean, module.running_var):
                    torch.distributed.all_reduce(buf)
                    buf.div_(world)

    def evaluate(self) -> dict:
        cfg = self.cfg
        self.sync_batchnorm_stats()
        result = evaluate(
            self.model_without_ddp,
            self.val_loader,
            cfg["nclass"],
            mode=cfg["eval_mode"],
            crop_size=cfg["crop_size"],
            flip=cfg["eval_flip"],
            scales=tuple(cfg["eval_scales"]),
            device=self.device,
            amp_dtype=self.amp_dtype,
        )
        self.model.train()
        return result

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole training state; a collective (every rank's RNG state is gathered)."""
        # CPU ranks keep their own BN running statistics; the checkpoint holds one model, so the ranks agree
        # on it first (otherwise a resumed run would restart every rank from rank 0's statistics).
        self.sync_batchnorm_stats()
        return {
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "nonfinite_steps": self.nonfinite_steps,
            "scaler_skips": self.scaler_skips,
            "world_size": self.dist.world_size,
            "rng": self._gather_rng(),
            "cfg": self.cfg,
        }

    def _gather_rng(self) -> list:
        states = [None] * self.dist.world_size
        if is_dist():
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states[0] = rng_state()
        return states

    def save(self, name: str, state: dict, previous: str | None = None) -> bool:
        """Rank 0 writes save_path/name atomically (keeping the old file as `previous` when given).

        A write that fails (disk full, file too large, folder gone) is logged with the path and the OS
        error; the file on disk stays as it was and the next save tries again. Returns False then.
        """
        if not self.dist.is_main or self.save_path is None:
            return True
        path = os.path.join(self.save_path, name)
        keep = os.path.join(self.save_path, previous) if previous else None
        try:
            ckpt.save_atomic(state, path, previous=keep)
        except OSError as err:
            self.failed_saves[name] = f"{path}: {err.strerror or err}"
            kept = "the previous file is kept" if os.path.isfile(path) else "there is no earlier file"
            logger.error(
                f"could not write checkpoint {path} at iteration {self.iteration}: "
                f"{type(err).__name__}: {err.strerror or err}; {kept}, training goes on and the next save "
                "tries again"
            )
            return False
        self.failed_saves.pop(name, None)
        return True

    def save_latest(self, state: dict | None = None) -> None:
        """latest.pth, with the one it replaces kept as previous.pth; not during a run of skipped steps.

        While steps are being skipped for non-finite values, latest.pth keeps the state from before
        the first of them, so a run that then stops can be resumed from there (the final iteration is
        always saved: its weights are those of the last good step).
        """
        if self.nonfinite_streak and self.iteration < self.total_iters:
            if self.dist.is_main:
                logger.warning(
                    f"iteration {self.iteration}: latest.pth not updated while steps are non-finite "
                    f"({self.nonfinite_streak} in a row)"
                )
            return
        if self.save("latest.pth", state if state is not None else self.state_dict(), "previous.pth"):
            self.saved_iteration = self.iteration

    def resume(self) -> bool:
        """Continue from save_path/latest.pth, or from previous.pth when latest.pth is unusable.

        Restarting the same command resumes. Rank 0 picks the file and tells the others. A damaged
        latest.pth (truncated, corrupted, pickled code, not a training checkpoint) is reported and
        renamed aside to latest.pth.corrupt, never deleted; when no file is usable the run stops
        with a CheckpointError naming them all rather than starting over.
        """
        if self.save_path is None:
            return False
        found, state = None, None
        if self.dist.is_main:
            for tmp in ckpt.remove_stale_temporaries(self.save_path):
                logger.info(f"removed {tmp}, left by a save that was interrupted")
            path, state, problems = ckpt.find_resumable(self.save_path)
            found = (path, problems)
        path, problems = broadcast_object(found)
        main = self.dist.is_main
        for bad, reason in problems if main else ():
            logger.warning(f"cannot resume from {bad}: {reason}")
        if path is None:
            if problems:
                raise ckpt.CheckpointError(
                    f"no usable checkpoint in {self.save_path} to resume from:\n  "
                    + "\n  ".join(reason for _, reason in problems)
                    + "\nNothing was deleted. Move these files away to start over, or restore one."
                )
            return False
        latest = os.path.join(self.save_path, "latest.pth")
        if main and any(bad == latest for bad, _ in problems):
            aside = _free_name(latest + ".corrupt")
            os.replace(latest, aside)
            logger.warning(f"renamed {latest} to {aside}; resuming from {path} instead")
        elif main and path != latest:
            logger.warning(f"{latest} is missing (a save was interrupted); resuming from {path}")
        if state is None:
            state = ckpt.load_training_state(path)
        self._load_state(state, path)
        logger.info(f"resumed from {path} at iteration {self.iteration}/{self.total_iters}")
        return True

    def _load_state(self, state: dict, path: str) -> None:
        try:
            ckpt.load_model_weights(self.model_without_ddp, ckpt.model_state(state), path)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state["method"])
            same_world = state["world_size"] == self.dist.world_size
            if same_world:
                set_rng_state(state["rng"][self.dist.rank])
        except ckpt.CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit this run: {type(err).__name__}: {err}"
            ) from err
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        self.best_iteration = state["best_iteration"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.scaler_skips = state.get("scaler_skips", 0)
        self.saved_iteration = self.iteration
        if not self.dist.is_main:
            return
        if not same_world:
            logger.warning(
                f"{path} was written by {state['world_size']} process(es), this run has "
                f"{self.dist.world_size}: random states are not restored and the data order changes, "
                "so the run continues but is not identical to an uninterrupted one"
            )
        if isinstance(state.get("cfg"), dict):
            changed = sorted(k for k in self.cfg if k in state["cfg"] and state["cfg"][k] != self.cfg[k])
            if changed:
                logger.warning(
                    f"the config differs from the one {path} was trained with: "
                    + ", ".join(f"{k}: {state['cfg'][k]!r} -> {self.cfg[k]!r}" for k in changed)
                )

    # ------------------------------------------------------------------ the loop
    def _log(self, loss: float, terms: dict, stats: dict) -> None:
        if self.writer is None:
            return
        it = self.iteration
        self.writer.add_scalar("train/loss", loss, it)
        for name, value in {**terms, **stats}.items():
            self.writer.add_scalar(f"train/{name}", value, it)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], it)
        self.writer.add_scalar("train/nonfinite_steps", self.nonfinite_steps, it)

    def _eval_due(self) -> bool:
        interval = self.cfg["eval_interval"] or self.iters_per_epoch
        return self.iteration % interval == 0 or self.iteration == self.total_iters

    def _eval_and_save(self) -> None:
        from dataset.classes import class_names
        from util.metrics import format_iou_table

        result = self.evaluate()
        miou = result["miou"]
        improved = miou > self.best_miou
        if improved:
            self.best_miou, self.best_iteration = miou, self.iteration
        names = class_names(self.cfg["dataset"], self.cfg["nclass"])
        logger.info(
            f"iter {self.iteration}/{self.total_iters}: val mIoU {miou:.2f} "
            f"(best {self.best_miou:.2f} at iter {self.best_iteration})\n"
            + format_iou_table(result["iou"], names)
        )
        if self.writer is not None:
            self.writer.add_scalar("eval/mIoU", miou, self.iteration)
            for name, iou in zip(names, result["iou"]):
                self.writer.add_scalar(f"eval_class/{name}", iou, self.iteration)
        state = self.state_dict()
        # best.pth first: a run killed between the two writes resumes from the older latest.pth,
        # evaluates this iteration again and rewrites the same best.pth; the other order would lose it.
        if improved:
            self.save(
                "best.pth",
                {"model": state["model"], "cfg": self.cfg, "iteration": self.iteration, "miou": miou},
            )
        self.save_latest(state)
        barrier()

    def _write_config(self) -> None:
        path = os.path.join(self.save_path, "config.yaml")
        try:
            with open(path + ".tmp", "w") as f:
                yaml.safe_dump(self.cfg, f, sort_keys=False)
            os.replace(path + ".tmp", path)
        except OSError as err:
            raise ConfigError(f"cannot write {path}: {err.strerror or err}") from err

    def fit(self) -> float:
        from tqdm import tqdm

        self.resume()
        if self.dist.is_main and self.save_path is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._write_config()
            self.writer = SummaryWriter(self.save_path)
        logger.info(
            f"{type(self.method).__name__}: {self.total_iters} iterations, {self.iters_per_epoch} per epoch, "
            f"{self.dist.world_size} process(es) on {self.device}"
        )
        bar = tqdm(
            total=self.total_iters, initial=self.iteration, disable=not self.dist.is_main, dynamic_ncols=True
        )
        self.model.train()
        start = time.time()
        while self.iteration < self.total_iters:
            epoch, start_batch = divmod(self.iteration, self.iters_per_epoch)
            for batch in self._batches(epoch, start_batch):
                # A skipped (non-finite) step still consumes its batch and advances the iteration, so
                # the data and the schedule stay where an uninterrupted run would have them.
                loss, terms, stats = self.train_step(batch)
                self.iteration += 1
                bar.update(1)
                if self.nonfinite_streak >= self.cfg["max_nonfinite_steps"]:
                    bar.close()
                    raise NonFiniteError(self._nonfinite_message())
                if self.iteration % self.cfg["log_interval"] == 0:
                    self._log(loss, terms, stats)
                    bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in terms.items()})
                if self._eval_due():
                    self._eval_and_save()
                elif self.cfg["save_interval"] and self.iteration % self.cfg["save_interval"] == 0:
                    self.save_latest()
                if self.iteration >= self.total_iters:
                    break
        bar.close()
        elapsed = time.time() - start
        logger.info(
            f"done in {elapsed:.0f}s: best val mIoU {self.best_miou:.2f} at iteration {self.best_iteration}"
            + (f"; {self.nonfinite_steps} non-finite step(s) skipped" if self.nonfinite_steps else "")
        )
        if self.writer is not None:
            self.writer.close()
        if self.failed_saves:
            raise ckpt.SaveError(
                "training finished but its last checkpoint could not be written: "
                + "; ".join(self.failed_saves.values())
                + ". The files on disk are the last good ones; free space and run the same command again "
                "to finish from them."
            )
        return self.best_miou


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ...: the first that does not exist (bad files are never overwritten)."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def parse_args(argv=None, description: str = ""):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--labeled-id-path", help="split file of labeled images (overrides the config)")
    parser.add_argument("--unlabeled-id-path", help="split file of unlabeled images (overrides the config)")
    parser.add_argument("--save-path", required=True, help="folder for checkpoints, logs and TensorBoard")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lr=0.002 amp=bf16")
    return parser.parse_intermixed_args(argv)


def build_trainer(method_cls, config: str, save_path: str, overrides=()) -> "Trainer":
    """Load and check the config and build the Trainer; a bad input exits with status 2 and a message."""
    try:
        cfg = load_config(config, list(overrides))
        return Trainer(method_cls, cfg, save_path, source=config)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        cleanup()
        sys.exit(EXIT_BAD_INPUT)


def run(trainer: "Trainer") -> float:
    """trainer.fit(), turning the faults it reports into a message and an exit status.

    2: a config, data file or checkpoint that cannot be used (named in the message); 3: too many
    non-finite steps in a row; 4: the final checkpoint could not be written. Any other exception is a
    bug and keeps its traceback.
    """
    try:
        return trainer.fit()
    except (ConfigError, ckpt.CheckpointError, DataError, NonFiniteError, ckpt.SaveError) as err:
        if isinstance(err, NonFiniteError):
            code = EXIT_NONFINITE
        elif isinstance(err, ckpt.SaveError):
            code = EXIT_SAVE_FAILED
        else:
            code = EXIT_BAD_INPUT
        # Every rank agrees on a non-finite stop: one message is enough. Other faults can be one rank's.
        if trainer.dist.is_main or not isinstance(err, NonFiniteError):
            rank = f" (rank {trainer.dist.rank})" if trainer.dist.distributed else ""
            logger.error(f"error{rank}: {_message(err)}")
        cleanup()
        sys.exit(code)
    finally:
        cleanup()


def _message(err: Exception) -> str:
    """The message of an error; for one raised in a loader worker, without the worker's traceback."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip() + " (raised in a data loader worker)"
    return text


def main(method_cls, argv=None) -> float:
    """Entry point of every method script: `torchrun ... METHOD.py --config ... --save-path ...`."""
    args = parse_args(argv, description=method_cls.__doc__ or "")
    overrides = list(args.overrides)
    if args.labeled_id_path:
        overrides.append(f"labeled_id_path={args.labeled_id_path}")
    if args.unlabeled_id_path:
        overrides.append(f"unlabeled_id_path={args.unlabeled_id_path}")
    return run(build_trainer(method_cls, args.config, args.save_path, overrides))
