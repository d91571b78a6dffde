"""The training loop, written once: the method's networks wrapped and optimised, its step taken, guarded,
logged, evaluated and checkpointed. The parts it drives: device.py (networks and batches on the device),
evaluation.py (evaluation, best score, BatchNorm across ranks), saving.py (what latest.pth holds, resume),
progress.py (iterations and seconds), guard.py, stop.py, logbook.py."""

import logging
import time

import torch

from dataset.check import check_data
from util.config import ConfigError, check_paths
from util.dist import DistInfo, barrier, broadcast_object, init_distributed
from util.engine.device import amp_dtype, to_device, wrap_networks
from util.engine.evaluation import Evaluator, RankBatchNorm
from util.engine.guard import NonFiniteError, NonFiniteGuard
from util.engine.logbook import Logbook, setup_logging
from util.engine.method import Method, Networks
from util.engine.progress import Progress, RunClock
from util.engine.rng import seed_everything
from util.engine.saving import Saver, TrainingState, lock_save_path, prepare_save_path
from util.engine.stop import StopRequested, ignore_stop_signals, process_stop
from util.losses import build_labeled_criterion

logger = logging.getLogger("semiseg")


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


def prepare_demo_data(cfg: dict, generate: bool = True) -> None:
    """The demo dataset is generated on first use (by rank 0, while the others wait); one made with other
    parameters is an error, never overwritten. `generate=False` only checks it (eval.py writes no data)."""
    if cfg["dataset"] == "demo":
        from dataset.demo import ensure_demo

        ensure_demo(cfg["data_root"], generate, **cfg["demo"])


def prepare_run(cfg: dict, save_path: str | None, source: str, uses_unlabeled: bool, dist: DistInfo):
    """Rank 0 prepares (and locks) the output folder and the demo data and checks the data; every rank
    stops on its error, or the others would wait forever at the next collective. Then every rank's log,
    with rank 0's warnings about the data. Returns the lock on save_path, held as long as it is kept."""
    error, lock, warnings = None, None, []
    if dist.is_main:
        try:
            if save_path is not None:
                prepare_save_path(save_path)
                lock = lock_save_path(save_path)
            prepare_demo_data(cfg)
            check_paths(cfg, source, need_unlabeled=uses_unlabeled)
            warnings = check_data(cfg, uses_unlabeled)  # every file training reads, before training
        except (ConfigError, OSError, ValueError) as err:
            error = str(err)
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    check_paths(cfg, source, need_unlabeled=uses_unlabeled)  # every rank: its own filesystem
    setup_logging(save_path, dist.is_main)
    for warning in warnings:  # what the data check found that trains but looks wrong
        logger.warning(warning)
    return lock


def optimizer_groups(method: Method, networks: Networks, cfg: dict) -> list[dict]:
    """The method's parameter groups of every trained network, each at lr times its lr_scale."""
    return [
        {**group, "lr": cfg["lr"] * group["lr_scale"]}
        for name, net in networks.trained.items()
        for group in method.param_groups(name, net)
    ]


class Trainer:
    def __init__(self, method_cls: type[Method], cfg: dict, save_path: str | None, source: str = "config"):
        self.dist = init_distributed()
        self.cfg, self.save_path, self.device = cfg, save_path, self.dist.device
        # the lock on save_path is held until this process ends
        self.lock = prepare_run(cfg, save_path, source, method_cls.uses_unlabeled, self.dist)
        seed_everything(cfg["seed"] + self.dist.rank, cfg["deterministic"])

        self.method = method_cls(cfg, build_labeled_criterion(cfg), self.device)
        self.networks = self.method.networks()
        wrapped = wrap_networks(self.networks, cfg, self.dist)
        self.trained_wrapped = [wrapped[name] for name in self.networks.trained]
        self.method.attach(wrapped, self.networks.all)
        groups = optimizer_groups(self.method, self.networks, cfg)
        self.optimizer = build_optimizer(groups, cfg)
        self.amp_dtype = amp_dtype(cfg["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.data = self.method.training_data(
            pin_memory=self.device.type == "cuda", save_path=save_path, worker_init=ignore_stop_signals
        )
        iters_per_epoch = self.data.iters_per_epoch
        self.progress = Progress(cfg["max_iters"] or cfg["epochs"] * iters_per_epoch, iters_per_epoch)
        self.method.total_iters = self.progress.total_iters
        self.clock = RunClock()
        self.histograms = {}  # the last step's statistics with more than one value
        self.guard = NonFiniteGuard(
            params=[p for group in groups for p in group["params"]],
            buffers=[b for net in self.networks.all.values() for b in net.buffers()],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.saver = Saver(save_path, self.dist.is_main)
        self.logbook = Logbook(cfg, self.saver, self.dist.is_main)
        self.stop = process_stop()
        self.batchnorm = RankBatchNorm(self.networks, self.device, self.dist.world_size)
        self.evaluator = Evaluator(
            cfg, self.method, self.networks, self.data.val_loader, self.device, self.amp_dtype,
            self.batchnorm, self.logbook,
        )  # fmt: skip
        self.training_state = TrainingState(
            cfg, self.dist, self.method, self.networks, self.optimizer, self.scaler, self.progress,
            self.guard, self.evaluator, self.clock, self.batchnorm, self.saver,
        )  # fmt: skip

    @property
    def iteration(self) -> int:
        """The iteration of the next step, from 0 (tests set it to place a step)."""
        return self.progress.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.progress.iteration = value

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
        lr = poly_lr(self.cfg["lr"], self.iteration, self.progress.total_iters, self.cfg["poly_power"])
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
            self.progress.scaler_skips += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.skip(self.iteration, self.method, grad_bad, bad_terms, self.dist.is_main)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> float:
        """Train to the end (from latest.pth when there is one); on a stop signal, write latest.pth at the
        iteration every rank stopped at and raise StopRequested."""
        from tqdm import tqdm

        total_iters = self.progress.total_iters
        self.stop.install()  # from here on a signal stops after the current step
        self.stop.agreed = False  # the ranks agree anew in this training's steps
        try:
            self.clock.start()
            self.training_state.resume()
            self.saver.write_config(self.cfg, self.iteration)
            self.logbook.open(self.save_path, self.iteration)
            logger.info(
                f"{type(self.method).__name__}: {total_iters} iterations, {self.progress.iters_per_epoch} "
                f"per epoch, {self.dist.world_size} process(es) on {self.device}"
            )
            bar = tqdm(
                total=total_iters, initial=self.iteration, disable=not self.dist.is_main, dynamic_ncols=True
            )
            start = time.time()
            if self.iteration == total_iters and self.evaluator.evaluated_at != self.iteration:
                # Resumed at the last iteration from a checkpoint written before evaluating it (by a stop or
                # save_interval, at what a shorter max_iters makes the end): what a finished run has.
                logger.info(f"iteration {self.iteration} is the last: evaluating it, as a finished run has")
                self._evaluate_and_save()
            self._train(bar)
            bar.close()
            if self.iteration < total_iters:
                self._stop_on_signal()
        finally:
            self.stop.restore()
            self.logbook.close()
        logger.info(
            f"done in {time.time() - start:.0f}s: best val mIoU {self.evaluator.best_miou:.2f} at iteration "
            f"{self.evaluator.best_iteration}"
            + (f"; {self.guard.steps} non-finite step(s) skipped" if self.guard.steps else "")
        )
        self.saver.check_final()
        return self.evaluator.best_miou

    def _train(self, bar) -> None:
        """Steps until the last iteration, or until the ranks agree to stop on a signal."""
        for net in self.trained_wrapped:
            net.train()
        while self.iteration < self.progress.total_iters and not self.stop.agreed:
            epoch, start_batch = divmod(self.iteration, self.progress.iters_per_epoch)
            for batch in self.batches(epoch, start_batch):
                # A skipped (non-finite) step still consumes its batch and advances the iteration, so
                # the data and the schedule stay where an uninterrupted run would have them.
                step_start = time.perf_counter()
                loss, terms, stats = self.train_step(batch)
                self.clock.train_seconds += time.perf_counter() - step_start
                self.iteration += 1
                bar.update(1)
                self._after_step(loss, terms, stats, bar)
                if self.iteration >= self.progress.total_iters or self.stop.agreed:
                    break

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
        if self.evaluator.due(self.progress):
            self._evaluate_and_save()
        elif cfg["save_interval"] and it % cfg["save_interval"] == 0:
            self.training_state.save_latest()

    def _evaluate_and_save(self) -> None:
        it, evaluator = self.iteration, self.evaluator
        pictures = {}
        results = evaluator.evaluate(pictures)
        score = evaluator.score(results, it)
        best = (evaluator.best_miou, evaluator.best_iteration)
        self.logbook.evaluation(
            it, self.progress.total_iters, results, score.network, best, self.clock.timing(it),
            self.networks.deploy, pictures, self.method.pseudo_labels.take("eval"),
        )  # fmt: skip
        state = self.training_state.state_dict()
        # best.pth first: a run killed between the two writes resumes from the older latest.pth,
        # evaluates this iteration again and rewrites the same best.pth; the other order would lose it.
        if score.improved:
            self.saver.save("best.pth", evaluator.best_checkpoint(score, it), it)
        self.training_state.save_latest(state)
        barrier()

    def _stop_on_signal(self) -> None:
        """Every rank agreed to stop after this step: latest.pth (unless this iteration's is written), with
        each rank's own BatchNorm statistics, which the uninterrupted run would have kept."""
        if self.saver.saved_iteration != self.iteration:
            self.training_state.save_latest(self.training_state.state_dict(with_batchnorm_per_rank=True))
        barrier()
        latest, saved = self.saver.path("latest.pth"), self.saver.saved_iteration
        kept = f"{latest} holds iteration {saved}" if latest and saved is not None else "nothing was saved"
        at = f"{self.iteration}/{self.progress.total_iters}"
        raise StopRequested(
            f"stopped by {self.stop.describe()} after iteration {at}: {kept}; "
            "run the same command to continue"
        )
