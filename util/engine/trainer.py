"""The training loop, written once: the method's networks wrapped and optimised, its step taken, guarded,
logged, evaluated and checkpointed."""

import inspect
import logging
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from dataset.check import check_data
from model.semseg.deeplabv3plus import use_channels_last
from util import checkpoint as ckpt
from util.config import ConfigError, check_paths, config_changes
from util.dist import barrier, broadcast_object, init_distributed, is_dist
from util.engine.guard import NonFiniteError, NonFiniteGuard
from util.engine.logbook import Logbook
from util.engine.method import Method
from util.engine.rng import rng_state, seed_everything, set_rng_state
from util.engine.saving import Saver, lock_save_path
from util.engine.stop import StopRequested, ignore_stop_signals, process_stop
from util.losses import build_labeled_criterion
from util.metrics import evaluate

logger = logging.getLogger("semiseg")

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


def build_optimizer(groups: list[dict], cfg: dict) -> torch.optim.SGD:
    """SGD over the parameter groups; the fused kernel (one pass over each tensor's parameters, gradient
    and momentum) where the parameters' device has one, the per-tensor loop elsewhere. Same update."""
    kwargs = dict(lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    try:
        return torch.optim.SGD(groups, fused=True, **kwargs)
    except RuntimeError:  # no fused SGD for this device
        return torch.optim.SGD(groups, **kwargs)


def poly_lr(base_lr: float, iteration: int, total_iters: int, power: float) -> float:
    """UniMatch's poly schedule: it updates the lr after each optimizer step, so step 0 uses the base lr
    and step t >= 1 uses base * (1 - (t - 1) / total) ** power."""
    if iteration == 0:
        return base_lr
    return base_lr * (1 - (iteration - 1) / total_iters) ** power


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


def prepare_demo_data(cfg: dict, generate: bool = True) -> None:
    """The demo dataset is generated on first use (by rank 0, while the others wait); one made with other
    parameters is an error, never overwritten. `generate=False` only checks it (eval.py writes no data)."""
    if cfg["dataset"] == "demo":
        from dataset.demo import ensure_demo

        ensure_demo(cfg["data_root"], generate, **cfg["demo"])


def batchnorm_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [
        buf
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var)
    ]


class Trainer:
    def __init__(self, method_cls: type[Method], cfg: dict, save_path: str | None, source: str = "config"):
        self.dist = init_distributed()
        self.cfg, self.save_path, self.device = cfg, save_path, self.dist.device
        data_warnings = self._prepare_outputs(source, method_cls.uses_unlabeled)
        setup_logging(save_path, self.dist.is_main)
        for warning in data_warnings:  # what the data check found that trains but looks wrong
            logger.warning(warning)
        seed_everything(cfg["seed"] + self.dist.rank, cfg["deterministic"])

        self.method = method_cls(cfg, build_labeled_criterion(cfg), self.device)
        self.networks = self.method.networks()
        self._wrap_networks()
        groups = [
            {**group, "lr": cfg["lr"] * group["lr_scale"]}
            for name, net in self.networks.trained.items()
            for group in self.method.param_groups(name, net)
        ]
        self.optimizer = build_optimizer(groups, cfg)
        self.amp_dtype = amp_dtype(cfg["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.data = self.method.training_data(
            pin_memory=self.device.type == "cuda", save_path=save_path, worker_init=ignore_stop_signals
        )
        self.iters_per_epoch = self.data.iters_per_epoch
        self.total_iters = cfg["max_iters"] or cfg["epochs"] * self.iters_per_epoch
        self.method.total_iters = self.total_iters
        self.iteration = 0
        self.best_miou, self.best_iteration = -1.0, 0  # the first evaluation always writes best.pth
        self.evaluated_at: int | None = None  # the iteration of the last evaluation
        self.scaler_skips = 0  # fp16 steps the GradScaler skipped for an overflow (its normal business)
        # Since iteration 0, across resumes (a resumed run continues from the checkpoint's counts):
        self.train_seconds = 0.0  # wall-clock spent in training steps (evaluations excluded)
        self.wall_seconds_before = 0.0  # wall-clock of the run before this process started
        self.wall_start = time.time()
        self.timed_from = 0  # the first iteration train_seconds counts
        self.histograms = {}  # the last step's statistics with more than one value
        nets = self.networks.all.values()
        self.guard = NonFiniteGuard(
            params=[p for group in groups for p in group["params"]],
            buffers=[b for net in nets for b in net.buffers()],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.saver = Saver(save_path, self.dist.is_main)
        self.logbook = Logbook(cfg, self.saver, self.dist.is_main)
        self.stop = process_stop()

    def _prepare_outputs(self, source: str, uses_unlabeled: bool) -> list[str]:
        """Rank 0 prepares (and locks) the output folder and the demo data and checks the data; every rank
        stops on its error, or the others would wait forever at the next collective. Returns rank 0's
        warnings about the data (none on the other ranks)."""
        error, self.lock, warnings = None, None, []
        if self.dist.is_main:
            try:
                if self.save_path is not None:
                    prepare_save_path(self.save_path)
                    self.lock = lock_save_path(self.save_path)  # held until this process ends
                prepare_demo_data(self.cfg)
                check_paths(self.cfg, source, need_unlabeled=uses_unlabeled)
                warnings = check_data(self.cfg, uses_unlabeled)  # every file training reads, before training
            except (ConfigError, OSError, ValueError) as err:
                error = str(err)
        error = broadcast_object(error)
        if error:
            raise ConfigError(error)
        check_paths(self.cfg, source, need_unlabeled=uses_unlabeled)  # every rank: its own filesystem
        return warnings

    def _wrap_networks(self) -> None:
        """Move every network to the device; DDP (and SyncBN on CUDA) around the trained ones; no gradient
        for the frozen ones. The method sees the wrapped modules as attributes."""
        nets = self.networks
        sync_bn = self.dist.distributed and self.device.type == "cuda"
        for group in (nets.trained, nets.frozen):
            for name, net in group.items():
                net = net.to(self.device)
                if self.cfg["channels_last"]:
                    use_channels_last(net, self.device)
                # SyncBN needs CUDA; it makes per-GPU batches of 2-4 behave like the global batch.
                group[name] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_bn else net
        for net in nets.frozen.values():
            net.requires_grad_(False)
        wrapped = dict(nets.all)
        if self.dist.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            for name, net in nets.trained.items():
                wrapped[name] = DistributedDataParallel(net, device_ids=device_ids, **NO_BUFFER_BROADCAST)
        if self.cfg["compile"]:  # the method's calls run compiled; weights are still read from `nets`
            wrapped = {name: torch.compile(net) for name, net in wrapped.items()}
        self.trained_wrapped = [wrapped[name] for name in nets.trained]
        self.method.attach(wrapped, nets.all)

    @property
    def model_without_ddp(self) -> torch.nn.Module:
        """The first trained network (the only one of single-network methods), without its DDP wrapper."""
        return next(iter(self.networks.trained.values()))

    def batches(self, epoch: int, start_batch: int = 0):
        return self.data.batches(epoch, start_batch)

    # ------------------------------------------------------------------ one step
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, batch: dict) -> tuple[float, dict, dict]:
        """One optimizer step on `batch`: (loss, {term: value}, {statistic: value}) as numbers."""
        batch = to_device(batch, self.device)
        lr = poly_lr(self.cfg["lr"], self.iteration, self.total_iters, self.cfg["poly_power"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.method.iteration = self.iteration
        self.guard.before_step(self.method)
        with self.autocast():
            losses, stats = self.method.step(batch)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # every rank runs backward, even on a NaN: DDP needs it

        names = [*losses, "total"]
        values = torch.stack([v.detach().float().reshape(()) for v in (*losses.values(), loss)])
        stats = {k: torch.as_tensor(v, device=self.device).detach().float() for k, v in stats.items()}
        self.histograms = {k: v for k, v in stats.items() if v.numel() > 1}
        stats = {k: v for k, v in stats.items() if v.numel() == 1}
        stat_values = list(stats.values())
        flags = self.guard.flags(values, stop_requested=self.stop.requested)
        numbers = torch.cat(
            (values, *[s.reshape(1) for s in stat_values], flags.flatten())
        ).tolist()  # the one sync
        width = len(names)
        grad_bad, bad_terms, self.stop.agreed = self.guard.verdict(names, numbers[width + len(stats) :])
        self._finish_step(grad_bad, bad_terms)
        terms = dict(zip(names[:-1], numbers[: width - 1]))
        return numbers[width - 1], terms, dict(zip(stats, numbers[width : width + len(stats)]))

    def _finish_step(self, grad_bad: bool, bad_terms: dict) -> None:
        """Take the optimizer step, or skip it when a loss term or a gradient is non-finite on any rank."""
        if not grad_bad and not bad_terms:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.guard.passed()
            with self.autocast():  # teachers' forwards after the step (CTT's banks) run like the step's
                self.method.after_optimizer_step()
        elif not bad_terms and self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0:
            # fp16 gradient overflow with a finite loss: the GradScaler skips the step and lowers the
            # scale, as it always does. Only once the scale is below 1 is it counted as a fault.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scaler_skips += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.skip(self.iteration, self.method, grad_bad, bad_terms, self.dist.is_main)

    # ------------------------------------------------------------------ evaluation
    def sync_batchnorm_stats(self) -> None:
        """Average BN running statistics over ranks where SyncBN does not apply (CPU processes).

        Parameters stay identical under DDP, but each rank's running mean/var follow its own batches;
        averaging them before evaluating or saving keeps every rank's networks the same.
        """
        if not self.ranks_own_batchnorm:
            return
        for buf in self.batchnorm_buffers():
            torch.distributed.all_reduce(buf)
            buf.div_(self.dist.world_size)

    @property
    def ranks_own_batchnorm(self) -> bool:
        """Whether each rank has BatchNorm statistics of its own (several processes without SyncBN)."""
        return is_dist() and self.device.type != "cuda"

    def batchnorm_buffers(self) -> list[torch.Tensor]:
        return [buf for net in self.networks.all.values() for buf in batchnorm_buffers(net)]

    def evaluate(self, pictures: dict | None = None) -> dict[str, dict]:
        """{network name: evaluation result} for every network the method evaluates; each network is left
        in the mode (train or eval) it was in. `pictures`, when given, receives TensorBoard's pictures."""
        cfg = self.cfg
        self.sync_batchnorm_stats()
        results = {}
        for name in self.networks.evaluate:
            net = self.networks.all[name]
            was_training = net.training
            collect = (
                None if pictures is None else self.logbook.picture_collector(pictures.setdefault(name, []))
            )
            results[name] = evaluate(
                net, self.data.val_loader, cfg["nclass"], mode=cfg["eval_mode"], crop_size=cfg["crop_size"],
                flip=cfg["eval_flip"], scales=tuple(cfg["eval_scales"]), device=self.device,
                amp_dtype=self.amp_dtype, on_prediction=collect,
            )  # fmt: skip
            net.train(was_training)
        return results

    def _eval_and_save(self) -> None:
        pictures = {}
        results = self.evaluate(pictures)
        self.evaluated_at = self.iteration
        # The run's score is the best deployable network's; best.pth holds that network.
        deployed = max(self.networks.deploy, key=lambda name: results[name]["miou"])
        miou = results[deployed]["miou"]
        improved = miou > self.best_miou
        if improved:
            self.best_miou, self.best_iteration = miou, self.iteration
        self.logbook.evaluation(
            self.iteration, self.total_iters, results, deployed, (self.best_miou, self.best_iteration),
            self.timing(), self.networks.deploy, pictures, self.method.pseudo_labels.take("eval"),
        )  # fmt: skip
        state = self.state_dict()
        # best.pth first: a run killed between the two writes resumes from the older latest.pth,
        # evaluates this iteration again and rewrites the same best.pth; the other order would lose it.
        if improved:
            weights = self.method.deploy_state(deployed, self.networks.all[deployed])
            best = {
                "model": weights,
                "network": deployed,
                "method_name": type(self.method).__name__,
                "code_version": ckpt.code_version(),
                "cfg": self.cfg,
                "iteration": self.iteration,
                "miou": miou,
            }
            self.saver.save("best.pth", best, self.iteration)
        self._save_latest(state)
        barrier()

    def wall_seconds(self) -> float:
        """Wall-clock seconds of the run since iteration 0: this process's and, after a resume, those of
        the processes before it up to the checkpoint it resumed from."""
        return self.wall_seconds_before + time.time() - self.wall_start

    def timing(self) -> dict:
        """Seconds per training step, and the training and wall-clock seconds since iteration 0."""
        return {
            "seconds_per_iter": self.train_seconds / max(self.iteration - self.timed_from, 1),
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds(),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The whole training state; a collective (every rank's RNG state is gathered)."""
        # CPU ranks keep their own BN running statistics; the checkpoint holds one copy of each network, so
        # the ranks agree on it first (otherwise a resumed run restarts every rank from rank 0's statistics).
        self.sync_batchnorm_stats()
        deploy = self.networks.deploy[0]
        own = to_device(self.method.rank_state_dict(), "cpu", non_blocking=False)
        return {
            "networks": {name: net.state_dict() for name, net in self.networks.all.items()},
            "model": self.method.deploy_state(deploy, self.networks.all[deploy]),  # for eval.py
            "method_name": type(self.method).__name__,
            "code_version": ckpt.code_version(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "method_per_rank": self._gather(own),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "evaluated_at": self.evaluated_at,
            "nonfinite_steps": self.guard.steps,
            "scaler_skips": self.scaler_skips,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds(),
            "world_size": self.dist.world_size,
            "rng": self._gather(rng_state()),
            "cfg": self.cfg,
        }

    def _gather(self, obj) -> list:
        """`obj` from every rank, in rank order (a collective)."""
        objects = [None] * self.dist.world_size
        if is_dist():
            torch.distributed.all_gather_object(objects, obj)
        else:
            objects[0] = obj
        return objects

    def _save_latest(self, state: dict | None = None) -> None:
        """latest.pth; not during a run of skipped steps, so that latest.pth keeps the state from before the
        first of them (the final iteration is always saved: its weights are those of the last good step)."""
        if self.guard.streak and self.iteration < self.total_iters:
            if self.dist.is_main:
                logger.warning(
                    f"iteration {self.iteration}: latest.pth not updated while steps are non-finite "
                    f"({self.guard.streak} in a row)"
                )
            return
        self.saver.save_latest(state if state is not None else self.state_dict(), self.iteration)

    def resume(self) -> bool:
        """Continue from save_path/latest.pth (or previous.pth when latest.pth is unusable)."""
        path, state = self.saver.find_resumable()
        if path is None:
            return False
        ours = type(self.method).__name__
        theirs = state.get("method_name", ours)  # checkpoints from before it was recorded: not known
        if theirs != ours:
            raise ckpt.CheckpointError(
                f"{path} was written by {theirs} (code {state.get('code_version', 'unknown')}); this is "
                f"{ours}. Resume it with {theirs}'s script, or give {ours} another --save-path"
            )
        try:
            self.load_state_dict(state)
        except ckpt.CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit this run: {type(err).__name__}: {err}"
            ) from err
        self.saver.saved_iteration = self.iteration
        if self.dist.is_main:
            self._warn_about_differences(state, path)
        if self.iteration > self.total_iters:
            raise ConfigError(
                f"{path} holds iteration {self.iteration}, past the end of this run ({self._length()}). "
                f"Nothing was changed: set max_iters to at least {self.iteration} to continue it, evaluate "
                "it with eval.py, or give another --save-path to train this run from the start"
            )
        logger.info(f"resumed from {path} at iteration {self.iteration}/{self.total_iters}")
        return True

    def _length(self) -> str:
        """The run's length in iterations and the config keys that set it."""
        if self.cfg["max_iters"]:
            return f"max_iters={self.total_iters}"
        return (
            f"epochs={self.cfg['epochs']} x {self.iters_per_epoch} iterations per epoch = {self.total_iters} "
            "iterations"
        )

    def load_state_dict(self, state: dict) -> None:
        networks = state.get("networks") or {"model": state["model"]}  # checkpoints before named networks
        ours = sorted(self.networks.all)
        if sorted(networks) != ours:
            raise ckpt.CheckpointError(
                f"the checkpoint holds networks {sorted(networks)}; this method has {ours}"
            )
        for name, net in self.networks.all.items():
            ckpt.load_model_weights(net, networks[name], f"network '{name}'")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        same_ranks = state["world_size"] == self.dist.world_size
        per_rank = state.get("method_per_rank")  # checkpoints from before it existed: none
        self.method.load_rank_state_dict(per_rank[self.dist.rank] if same_ranks and per_rank else {})
        if same_ranks:
            set_rng_state(state["rng"][self.dist.rank])
            own = state.get("batchnorm_per_rank")  # written by a stop on a signal (_own_batchnorm_state)
            for buf, value in zip(self.batchnorm_buffers(), own[self.dist.rank] if own else ()):
                buf.copy_(value)
        self.iteration = state["iteration"]
        self.best_miou, self.best_iteration = state["best_miou"], state["best_iteration"]
        # checkpoints from before it was recorded: as if evaluated where they stopped (nothing is redone)
        self.evaluated_at = state.get("evaluated_at", self.iteration)
        self.guard.steps = state.get("nonfinite_steps", 0)
        self.scaler_skips = state.get("scaler_skips", 0)
        # checkpoints from before the run's seconds were kept: counted from here on
        self.train_seconds = state.get("train_seconds", 0.0)
        self.timed_from = 0 if "train_seconds" in state else self.iteration
        self.wall_seconds_before, self.wall_start = state.get("wall_seconds", 0.0), time.time()

    def _warn_about_differences(self, state: dict, path: str) -> None:
        version, ours = state.get("code_version", "unknown"), ckpt.code_version()
        if version != ours:
            logger.warning(f"{path} was written by code {version}; this is code {ours}")
        if state["world_size"] != self.dist.world_size:
            logger.warning(
                f"{path} was written by {state['world_size']} process(es), this run has "
                f"{self.dist.world_size}: random states are not restored and the data order changes, "
                "so the run continues but is not identical to an uninterrupted one"
            )
        changes = config_changes(state["cfg"], self.cfg) if isinstance(state.get("cfg"), dict) else []
        if changes:
            logger.warning(
                f"the config differs from the one {path} was trained with: " + ", ".join(map(str, changes))
            )

    # ------------------------------------------------------------------ the loop
    def _after_step(self, loss: float, terms: dict, stats: dict, bar) -> None:
        """Stop on a run of non-finite steps; log; evaluate and save when due."""
        cfg, it = self.cfg, self.iteration
        if self.guard.streak >= cfg["max_nonfinite_steps"]:
            bar.close()
            latest = self.saver.path("latest.pth")
            raise NonFiniteError(
                self.guard.message(it, latest, self.saver.saved_iteration, cfg["max_nonfinite_steps"])
            )
        if it % cfg["log_interval"] == 0:
            extra = {"lr": self.optimizer.param_groups[0]["lr"], "nonfinite_steps": self.guard.steps}
            pseudo_labels = self.method.pseudo_labels.take(
                "log"
            )  # a collective, at the same step on every rank
            self.logbook.step(it, loss, terms, stats, self.histograms, extra, pseudo_labels)
            bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.3f}" for k, v in terms.items()})
        if it % (cfg["eval_interval"] or self.iters_per_epoch) == 0 or it == self.total_iters:
            self._eval_and_save()
        elif cfg["save_interval"] and it % cfg["save_interval"] == 0:
            self._save_latest()

    def fit(self) -> float:
        """Train to the end (from latest.pth when there is one); on a stop signal, write latest.pth at the
        iteration every rank stopped at and raise StopRequested."""
        from tqdm import tqdm

        self.stop.install()  # from here on a signal stops after the current step
        self.stop.agreed = False  # the ranks agree anew in this training's steps
        try:
            self.wall_start = time.time()
            self.resume()
            self.saver.write_config(self.cfg, self.iteration)
            self.logbook.open(self.save_path, self.iteration)
            logger.info(
                f"{type(self.method).__name__}: {self.total_iters} iterations, {self.iters_per_epoch} per "
                f"epoch, {self.dist.world_size} process(es) on {self.device}"
            )
            bar = tqdm(
                total=self.total_iters,
                initial=self.iteration,
                disable=not self.dist.is_main,
                dynamic_ncols=True,
            )
            start = time.time()
            if self.iteration == self.total_iters and self.evaluated_at != self.iteration:
                # Resumed at the last iteration from a checkpoint written before evaluating it (by a stop or
                # save_interval, at what a shorter max_iters makes the end): what a finished run has.
                logger.info(f"iteration {self.iteration} is the last: evaluating it, as a finished run has")
                self._eval_and_save()
            self._train(bar)
            bar.close()
            if self.iteration < self.total_iters:
                self._stop_on_signal()
        finally:
            self.stop.restore()
            self.logbook.close()
        logger.info(
            f"done in {time.time() - start:.0f}s: best val mIoU {self.best_miou:.2f} at iteration "
            f"{self.best_iteration}"
            + (f"; {self.guard.steps} non-finite step(s) skipped" if self.guard.steps else "")
        )
        self.saver.check_final()
        return self.best_miou

    def _train(self, bar) -> None:
        """Steps until the last iteration, or until the ranks agree to stop on a signal."""
        for net in self.trained_wrapped:
            net.train()
        while self.iteration < self.total_iters and not self.stop.agreed:
            epoch, start_batch = divmod(self.iteration, self.iters_per_epoch)
            for batch in self.batches(epoch, start_batch):
                # A skipped (non-finite) step still consumes its batch and advances the iteration, so
                # the data and the schedule stay where an uninterrupted run would have them.
                step_start = time.perf_counter()
                loss, terms, stats = self.train_step(batch)
                self.train_seconds += time.perf_counter() - step_start
                self.iteration += 1
                bar.update(1)
                self._after_step(loss, terms, stats, bar)
                if self.iteration >= self.total_iters or self.stop.agreed:
                    break

    def _own_batchnorm_state(self) -> dict:
        """Each rank's own BatchNorm statistics, for a save the uninterrupted run would not make: state_dict
        averages them over the ranks, which the run would otherwise only do at its next evaluation or save;
        a resume puts each rank's own back (load_state_dict)."""
        if not self.ranks_own_batchnorm:
            return {}
        own = self._gather([buf.clone() for buf in self.batchnorm_buffers()])
        return {"batchnorm_per_rank": own}

    def _stop_on_signal(self) -> None:
        """Every rank agreed to stop after this step: latest.pth (unless this iteration's is written)."""
        if self.saver.saved_iteration != self.iteration:
            state = self._own_batchnorm_state()
            self._save_latest({**self.state_dict(), **state})
        barrier()
        latest, saved = self.saver.path("latest.pth"), self.saver.saved_iteration
        kept = f"{latest} holds iteration {saved}" if latest and saved is not None else "nothing was saved"
        raise StopRequested(
            f"stopped by {self.stop.describe()} after iteration {self.iteration}/{self.total_iters}: {kept}; "
            "run the same command to continue"
        )
