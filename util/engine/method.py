"""What a method is to the engine: the networks it declares, its step, and the state it carries."""

from dataclasses import dataclass, field

import torch
from torch import nn

from model import build_model
from util.data import TrainingData
from util.pseudo_labels import PseudoLabelMeter


@dataclass
class Networks:
    """A method's networks, declared once; the engine wraps, optimises, saves, restores and evaluates them.

    trained:  optimised by one SGD (DDP-wrapped when distributed, SyncBN on CUDA), saved and restored.
    frozen:   kept without gradient (EMA teachers, an earlier stage's teacher); saved and restored, and their
              buffers are put back when a step is skipped.
    evaluate: evaluated at every evaluation (default: the first trained network).
    deploy:   candidates for best.pth (default: the first evaluated). At each evaluation the best-scoring
              candidate gives the run's score, and best.pth holds its weights.
    """

    trained: dict[str, nn.Module]
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    evaluate: tuple[str, ...] = ()
    deploy: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.trained:
            raise ValueError("a method must train at least one network")
        both = set(self.trained) & set(self.frozen)
        if both:
            raise ValueError(f"networks {sorted(both)} are declared both trained and frozen")
        self.evaluate = tuple(self.evaluate) or (next(iter(self.trained)),)
        self.deploy = tuple(self.deploy) or self.evaluate[:1]
        for name in (*self.evaluate, *self.deploy):
            if name not in self.all:
                raise ValueError(f"network '{name}' is evaluated or deployed but not declared")
        missing = set(self.deploy) - set(self.evaluate)
        if missing:
            raise ValueError(f"networks {sorted(missing)} are deployed but not evaluated")

    @property
    def all(self) -> dict[str, nn.Module]:
        return {**self.trained, **self.frozen}


class Method:
    """One semi-supervised method: the networks it declares, its training step and what it carries.

    `step(batch)` gets a dict with 'labeled' = (img_x, mask_x) and, when `uses_unlabeled`, 'unlabeled'
    and (unless `uses_mix` is False) 'mix' = (img_w, img_s1, img_s2, ignore_mask, cutmix_box1,
    cutmix_box2), all on the device; 'mix' is a second unlabeled batch, UniMatch's CutMix partners. It
    returns ({name: weighted loss term}, {name: statistic to log}), both as tensors; the engine sums the
    terms and turns everything into numbers in its one host sync per step.

    After `networks()`, the engine sets one attribute per network (`self.model`, `self.teacher_a`, ...);
    trained networks are DDP-wrapped when distributed, and `unwrapped(name)` is the plain module. The
    engine keeps `iteration` (the step about to run, from 0) and `total_iters` up to date.

    When the batch holds 'truth' (the unlabeled images' masks, see util.data.TrainingData), the step
    records each target its unlabeled losses train on with `self.pseudo_labels.add(name, pseudo_label,
    weight, truth)`, the masks mixed like the images; the engine logs their quality. The masks reach no
    loss (tests/test_pseudo_labels.py checks every method).
    """

    uses_unlabeled = True
    uses_mix = True  # False: the loaders skip the mix stream (a method that mixes within its batch)

    def __init__(self, cfg: dict, criterion_l, device: torch.device):
        self.cfg = cfg
        self.criterion_l = criterion_l
        self.device = device
        self.iteration = 0
        self.total_iters = 1
        self._unwrapped: dict[str, nn.Module] = {}
        self.pseudo_labels = PseudoLabelMeter(cfg["nclass"])

    def networks(self) -> Networks:
        """Called once on every rank, after seeding: one DeepLabV3+ named 'model' unless overridden."""
        return Networks(trained={"model": build_model(self.cfg)})

    def param_groups(self, name: str, module: nn.Module) -> list[dict]:
        """Learning-rate groups of a trained network: the backbone at lr, the rest at lr * lr_multi."""
        if hasattr(module, "backbone_parameters"):
            return [
                {"params": module.backbone_parameters(), "lr_scale": 1.0},
                {"params": module.head_parameters(), "lr_scale": self.cfg["lr_multi"]},
            ]
        return [
            {"params": [p for p in module.parameters() if p.requires_grad], "lr_scale": self.cfg["lr_multi"]}
        ]

    def training_data(self, pin_memory: bool, save_path: str | None, worker_init=None):
        """The training streams and the validation loader: an object with `batches(epoch, start_batch)`,
        `iters_per_epoch` and `val_loader`, as util.data.TrainingData (the default). A method whose batches
        hold more than UniMatch's streams builds its own; `save_path` is where it may cache what it
        derives from the data (None in benchmarks); `worker_init` goes to every loader worker."""
        return TrainingData(self.cfg, self.uses_unlabeled, pin_memory, worker_init, uses_mix=self.uses_mix)

    def deploy_state(self, name: str, module: nn.Module) -> dict:
        """The weights best.pth holds for network `name`: a state dict that `eval.py` loads into the
        config's model (an EMA teacher gives the network it averages)."""
        return getattr(module, "module", module).state_dict()

    def attach(self, modules: dict[str, nn.Module], unwrapped: dict[str, nn.Module]) -> None:
        """Called by the engine once the networks are wrapped."""
        self._unwrapped = dict(unwrapped)
        for name, module in modules.items():
            setattr(self, name, module)

    def unwrapped(self, name: str) -> nn.Module:
        return self._unwrapped[name]

    def step(self, batch: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step that was taken (not skipped), under the step's autocast: EMA
        teachers update here."""

    def state_dict(self) -> dict:
        """What the method carries between steps besides its networks (memories, banks, queues), the same
        on every process: checkpoints hold one copy."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(
                f"{type(self).__name__} carries no state, but the checkpoint has {sorted(state)}"
            )

    def rank_state_dict(self) -> dict:
        """What this process carries between steps that the others do not (its own last batch):
        checkpoints hold every process's, and a resume gives each its own back."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        """`state` from rank_state_dict(); {} when the checkpoint has none for this process (it was
        written by another number of processes, or before the method had such state)."""
        if state:
            raise ValueError(
                f"{type(self).__name__} carries no per-process state, but the checkpoint has {sorted(state)}"
            )
