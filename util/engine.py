"""The training loop, written once for every method.

A method script defines a `Method` subclass whose `step(batch)` returns its weighted loss terms; the
engine owns everything that is the same for all methods: process group, seeds, loaders, DDP, optimizer,
poly schedule, autocast, checkpoints, logging and evaluation.
"""

import argparse
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from dataset.semi import SemiDataset
from model import build_model
from util import checkpoint as ckpt
from util.config import ConfigError, check_paths, load_config
from util.data import _mix, train_loader
from util.dist import barrier, broadcast_object, cleanup, init_distributed, is_dist
from util.losses import build_labeled_criterion
from util.metrics import ShardSampler, evaluate

logger = logging.getLogger("semiseg")


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
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses, stats = self.method.step(batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        terms = {name: float(value.detach()) for name, value in losses.items()}
        return float(loss.detach()), terms, stats

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

    def save(self, name: str, state: dict) -> None:
        if self.dist.is_main and self.save_path is not None:
            ckpt.save_atomic(state, os.path.join(self.save_path, name))

    def resume(self) -> bool:
        """Continue from save_path/latest.pth when it exists (restarting the same command resumes)."""
        path = None if self.save_path is None else os.path.join(self.save_path, "latest.pth")
        if path is None or not os.path.isfile(path):
            return False
        state = ckpt.load(path)
        ckpt.load_model_weights(self.model_without_ddp, ckpt.model_state(state), path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.iteration = state["iteration"]
        self.best_miou = state["best_miou"]
        self.best_iteration = state["best_iteration"]
        if state.get("world_size") == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        logger.info(f"resumed from {path} at iteration {self.iteration}/{self.total_iters}")
        return True

    # ------------------------------------------------------------------ the loop
    def _log(self, loss: float, terms: dict, stats: dict) -> None:
        if self.writer is None:
            return
        it = self.iteration
        self.writer.add_scalar("train/loss", loss, it)
        for name, value in {**terms, **stats}.items():
            self.writer.add_scalar(f"train/{name}", value, it)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], it)

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
        self.save("latest.pth", state)
        if improved:
            self.save(
                "best.pth",
                {"model": state["model"], "cfg": self.cfg, "iteration": self.iteration, "miou": miou},
            )
        barrier()

    def fit(self) -> float:
        from tqdm import tqdm

        self.resume()
        if self.dist.is_main and self.save_path is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.save_path)
            with open(os.path.join(self.save_path, "config.yaml"), "w") as f:
                yaml.safe_dump(self.cfg, f, sort_keys=False)
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
                loss, terms, stats = self.train_step(batch)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {terms}")
                self.iteration += 1
                bar.update(1)
                if self.iteration % self.cfg["log_interval"] == 0:
                    self._log(loss, terms, stats)
                    bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in terms.items()})
                if self._eval_due():
                    self._eval_and_save()
                elif self.cfg["save_interval"] and self.iteration % self.cfg["save_interval"] == 0:
                    self.save("latest.pth", self.state_dict())
                if self.iteration >= self.total_iters:
                    break
        bar.close()
        elapsed = time.time() - start
        logger.info(
            f"done in {elapsed:.0f}s: best val mIoU {self.best_miou:.2f} at iteration {self.best_iteration}"
        )
        if self.writer is not None:
            self.writer.close()
        return self.best_miou


def parse_args(argv=None, description: str = ""):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/pascal.yaml")
    parser.add_argument("--labeled-id-path", help="split file of labeled images (overrides the config)")
    parser.add_argument("--unlabeled-id-path", help="split file of unlabeled images (overrides the config)")
    parser.add_argument("--save-path", required=True, help="folder for checkpoints, logs and TensorBoard")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. lr=0.002 amp=bf16")
    return parser.parse_intermixed_args(argv)


def main(method_cls, argv=None) -> float:
    """Entry point of every method script: `torchrun ... METHOD.py --config ... --save-path ...`."""
    args = parse_args(argv, description=method_cls.__doc__ or "")
    overrides = list(args.overrides)
    if args.labeled_id_path:
        overrides.append(f"labeled_id_path={args.labeled_id_path}")
    if args.unlabeled_id_path:
        overrides.append(f"unlabeled_id_path={args.unlabeled_id_path}")
    try:
        cfg = load_config(args.config, overrides)
        trainer = Trainer(method_cls, cfg, args.save_path, source=args.config)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        cleanup()
        sys.exit(2)
    try:
        return trainer.fit()
    finally:
        cleanup()
