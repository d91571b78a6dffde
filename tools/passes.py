"""Forward passes of one training step, counted with forward hooks, and which of them reach a loss.

A *pass* is one call of a network's classifier, the last layer every prediction goes through: a whole
forward, a forward with its feature-perturbed copy, or a head-only call such as MLCL's SAI. Its *rows*
are the images (or feature copies) it predicts; the backbone's rows are counted too.

A row *reaches a loss* when the step's loss depends on it, through a gradient path or through a
pseudo-label or confidence that a loss reads. This is tested directly: the step is run again from the
same weights, method state, random state and batch, with that one row of that pass replaced by confident
random logits, and the row reaches a loss when any loss term changes. The count runs on a tiny network of
the method's architecture with conf_thresh 0, so that every pseudo-label is used and a threshold that no
pixel of a freshly initialised network passes cannot hide a path that exists.
"""

import copy
from dataclasses import dataclass

import torch

from model.semseg.deeplabv3plus import DeepLabV3Plus
from util.losses import build_labeled_criterion

# A small network of the same architecture: the count is structural, it does not depend on the width.
TINY = {
    "backbone": "resnet18",
    "deep_stem": False,
    "backbone_width": 8,
    "head_channels": 16,
    "pretrained": None,
}
SIZE = 65  # 4 * 17 - 3: a 17 x 17 decoder grid and a 5 x 5 encoder grid
REPLACEMENT_SCALE = 100.0  # logits this large give confidences near 1


@dataclass
class PassCount:
    passes: int  # classifier calls
    backbone_rows: int  # images through the backbone
    rows: int  # predictions made: rows of the classifier's outputs
    reaching: int  # rows the loss depends on

    def __str__(self) -> str:
        return (
            f"{self.passes} passes, {self.backbone_rows} backbone rows, {self.rows} head rows, "
            f"{self.reaching} reach a loss"
        )


def random_batch(batch_size: int, nclass: int, size: int = SIZE, seed: int = 0) -> dict:
    """A batch of the engine's layout: random images and labels, padded bottom rows, rectangular boxes."""
    g = torch.Generator().manual_seed(seed)
    images = lambda: torch.randn(batch_size, 3, size, size, generator=g)  # noqa: E731

    def unlabeled():
        ignore = torch.zeros(batch_size, size, size, dtype=torch.long)
        ignore[:, -4:] = 255
        boxes = []
        for _ in range(2):
            box = torch.zeros(batch_size, size, size, dtype=torch.long)
            top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
            box[:, top : top + size // 2, left : left + size // 2] = 1
            boxes.append(box)
        return (images(), images(), images(), ignore, *boxes)

    labels = torch.randint(0, nclass, (batch_size, size, size), generator=g)
    return {"labeled": (images(), labels), "unlabeled": unlabeled(), "mix": unlabeled()}


class _Recorder:
    """Forward hooks on every DeepLabV3Plus's classifier and backbone: rows per call, and one row of one
    classifier call replaced when asked."""

    def __init__(self, networks):
        self.rows, self.backbone_rows, self.replace = [], 0, None
        self.generator = torch.Generator()
        self.handles = []
        for net in networks:
            for m in net.modules():
                if isinstance(m, DeepLabV3Plus):
                    self.handles.append(m.classifier.register_forward_hook(self._on_classifier))
                    # the stem's first layer: every image the backbone sees passes it once
                    self.handles.append(m.backbone.conv1.register_forward_hook(self._on_backbone))

    def _on_backbone(self, module, inputs, output):
        self.backbone_rows += inputs[0].shape[0]

    def _on_classifier(self, module, inputs, output):
        call = len(self.rows)
        self.rows.append(output.shape[0])
        if self.replace is None or self.replace[0] != call:
            return None
        row = self.replace[1]
        output = output.clone()
        noise = torch.randn(output[row].shape, generator=self.generator) * REPLACEMENT_SCALE
        output[row] = noise.to(output.device, output.dtype)
        return output

    def remove(self):
        for handle in self.handles:
            handle.remove()


def count_passes(method_cls, cfg: dict, size: int = SIZE, seed: int = 0) -> PassCount:
    """Passes and rows of one step of `method_cls` at `cfg`'s method settings, on a tiny network and a
    random batch of `cfg['batch_size']` images of size x size."""
    cfg = {**copy.deepcopy(cfg), **TINY, "conf_thresh": 0.0}
    torch.manual_seed(seed)
    method = method_cls(cfg, build_labeled_criterion(cfg), torch.device("cpu"))
    networks = method.networks()
    nets = networks.all
    method.attach(nets, nets)
    for net in networks.trained.values():
        net.train()  # as the engine trains them; frozen networks keep the mode their method gave them
    modes = {name: net.training for name, net in nets.items()}
    method.iteration = method.total_iters = 1  # ramped weights (MLCL's SAI) at their full value
    weights = {name: copy.deepcopy(net.state_dict()) for name, net in nets.items()}
    method_state = copy.deepcopy(method.state_dict())
    batch = random_batch(cfg["batch_size"], cfg["nclass"], size, seed)
    recorder = _Recorder(nets.values())

    def terms(replace=None):
        for name, net in nets.items():
            net.load_state_dict(weights[name])
            net.train(modes[name])
        method.load_state_dict(copy.deepcopy(method_state))
        torch.manual_seed(seed)
        recorder.rows, recorder.backbone_rows, recorder.replace = [], 0, replace
        recorder.generator.manual_seed(seed)
        losses, _ = method.step(batch)
        return {name: value.detach().double() for name, value in losses.items()}

    try:
        reference = terms()
        rows, backbone_rows = list(recorder.rows), recorder.backbone_rows
        reaching = 0
        for call, n in enumerate(rows):
            for row in range(n):
                changed = terms((call, row))
                reaching += any(
                    not torch.allclose(changed[k], reference[k], rtol=1e-6, atol=0) for k in reference
                )
    finally:
        recorder.remove()
    return PassCount(len(rows), backbone_rows, sum(rows), reaching)
