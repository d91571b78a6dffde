"""Evaluation of the networks a method names, the run's best score and what best.pth holds, and the BatchNorm
statistics that CPU ranks keep each their own, averaged before every evaluation and save."""

from dataclasses import dataclass

import torch

from util import checkpoint as ckpt
from util.dist import all_gather_objects, is_dist
from util.engine.logbook import Logbook
from util.engine.method import Method, Networks
from util.engine.progress import Progress
from util.metrics import evaluate


def batchnorm_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [
        buf
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var)
    ]


class RankBatchNorm:
    """The BatchNorm running statistics of every network, where each rank has its own: several processes
    without SyncBN (which needs CUDA). Parameters stay identical under DDP, but each rank's running mean/var
    follow its own batches."""

    def __init__(self, networks: Networks, device: torch.device, world_size: int):
        self.networks, self.device, self.world_size = networks, device, world_size

    @property
    def ranks_differ(self) -> bool:
        """Whether each rank has BatchNorm statistics of its own (several processes without SyncBN)."""
        return is_dist() and self.device.type != "cuda"

    def buffers(self) -> list[torch.Tensor]:
        return [buf for net in self.networks.all.values() for buf in batchnorm_buffers(net)]

    def average(self) -> None:
        """Average the statistics over the ranks (a collective), so that every rank's networks are the same
        for an evaluation or a save."""
        if not self.ranks_differ:
            return
        for buf in self.buffers():
            torch.distributed.all_reduce(buf)
            buf.div_(self.world_size)

    def per_rank_state_dict(self) -> dict:
        """Every rank's own statistics (a collective), for a save the uninterrupted run would not make (a
        stop on a signal): the save averages them, which the run would otherwise only do at its next
        evaluation or save; a resume puts each rank's own back (load_per_rank_state_dict)."""
        if not self.ranks_differ:
            return {}
        return {"batchnorm_per_rank": all_gather_objects([buf.clone() for buf in self.buffers()])}

    def load_per_rank_state_dict(self, state: dict, rank: int) -> None:
        """This rank's statistics from a checkpoint's per_rank_state_dict(); none when it has none."""
        own = state.get("batchnorm_per_rank")
        for buf, value in zip(self.buffers(), own[rank] if own else ()):
            buf.copy_(value)


@dataclass
class Score:
    """One evaluation's score: that of the best-scoring deployable network."""

    network: str
    miou: float
    improved: bool  # better than every earlier evaluation: best.pth gets this network


class Evaluator:
    """Evaluates the networks the method names, says when an evaluation is due, and keeps the run's best
    score and the iteration of its last evaluation."""

    def __init__(
        self,
        cfg: dict,
        method: Method,
        networks: Networks,
        val_loader,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        batchnorm: RankBatchNorm,
        logbook: Logbook,
    ):
        self.cfg, self.method, self.networks, self.val_loader = cfg, method, networks, val_loader
        self.device, self.amp_dtype, self.batchnorm, self.logbook = device, amp_dtype, batchnorm, logbook
        self.best_miou, self.best_iteration = -1.0, 0  # the first evaluation always writes best.pth
        self.evaluated_at: int | None = None  # the iteration of the last evaluation

    def due(self, progress: Progress) -> bool:
        """Whether the iteration just reached is evaluated: every eval_interval iterations (or every epoch),
        and the last."""
        it = progress.iteration
        return it % (self.cfg["eval_interval"] or progress.iters_per_epoch) == 0 or it == progress.total_iters

    def evaluate(self, pictures: dict | None = None) -> dict[str, dict]:
        """{network name: evaluation result} for every network the method evaluates; each network is left
        in the mode (train or eval) it was in. `pictures`, when given, receives TensorBoard's pictures."""
        cfg = self.cfg
        self.batchnorm.average()
        results = {}
        for name in self.networks.evaluate:
            net = self.networks.all[name]
            was_training = net.training
            collect = (
                None if pictures is None else self.logbook.picture_collector(pictures.setdefault(name, []))
            )
            results[name] = evaluate(
                net, self.val_loader, cfg["nclass"], mode=cfg["eval_mode"], crop_size=cfg["crop_size"],
                flip=cfg["eval_flip"], scales=tuple(cfg["eval_scales"]), device=self.device,
                amp_dtype=self.amp_dtype, on_prediction=collect,
            )  # fmt: skip
            net.train(was_training)
        return results

    def score(self, results: dict[str, dict], iteration: int) -> Score:
        """Record the evaluation of `iteration`: the run's score is the best deployable network's."""
        self.evaluated_at = iteration
        deployed = max(self.networks.deploy, key=lambda name: results[name]["miou"])
        miou = results[deployed]["miou"]
        improved = miou > self.best_miou
        if improved:
            self.best_miou, self.best_iteration = miou, iteration
        return Score(deployed, miou, improved)

    def best_checkpoint(self, score: Score, iteration: int) -> dict:
        """What best.pth holds: the deployed weights of the scored network, for eval.py."""
        return {
            "model": self.method.deploy_state(score.network, self.networks.all[score.network]),
            "network": score.network,
            "method_name": type(self.method).__name__,
            "code_version": ckpt.code_version(),
            "cfg": self.cfg,
            "iteration": iteration,
            "miou": score.miou,
        }

    def state_dict(self) -> dict:
        return {
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "evaluated_at": self.evaluated_at,
        }

    def load_state_dict(self, state: dict, iteration: int) -> None:
        """`state` of a checkpoint at `iteration`; one from before evaluated_at was recorded counts as
        evaluated where it stopped (nothing is redone)."""
        self.best_miou, self.best_iteration = state["best_miou"], state["best_iteration"]
        self.evaluated_at = state.get("evaluated_at", iteration)
