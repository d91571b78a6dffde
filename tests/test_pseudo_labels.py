"""Pseudo-label quality: the counts and metrics on a hand example, the unlabeled masks carried through the
augmentation with the image, and, for every method, the proof that those masks reach no loss."""

import copy
import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.semi import TRUTH, SemiDataset
from util.config import load_config
from util.data import SeededDataset
from util.losses import build_labeled_criterion
from util.pseudo_labels import PseudoLabelMeter, pseudo_label_counts, quality_from_counts


def test_quality_on_a_hand_example():
    # one image, 2 x 3 pixels, 3 classes
    truth = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
    label = torch.tensor([[[0, 1, 1], [2, 0, 255]]])  # 255: the loss skips the last pixel
    weight = torch.tensor([[[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]])
    counts = pseudo_label_counts(label, weight, truth, nclass=3)
    confusion = counts[:9].view(3, 3)
    # weighted (mask, pseudo-label) pairs: (0,0) 1.0, (0,1) 0.5, (1,1) 0 (weight 0), (2,2) 1.0; the pixel
    # without a mask and the ignored pseudo-label count nothing
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0, 0], expected[0, 1], expected[2, 2] = 1.0, 0.5, 1.0
    assert torch.equal(confusion, expected)
    assert counts[-2].item() == 3  # pixels with a mask and a weight above 0
    assert counts[-1].item() == 5  # pixels with a mask
    quality = quality_from_counts(counts, 3)
    assert quality.accuracy == pytest.approx(100 * 2.0 / 2.5)
    # IoU: class 0: 1 / (1.5 + 1 - 1) ; class 1: 0 / (0 + 0.5 - 0) ; class 2: 1 / 1
    assert quality.miou == pytest.approx(100 * (1 / 1.5 + 0 + 1) / 3)
    assert quality.used == pytest.approx(100 * 3 / 5)


def test_meter_windows_restart_independently():
    meter = PseudoLabelMeter(nclass=2)
    truth = torch.tensor([[[0, 1]]])
    meter.add("s", torch.tensor([[[0, 0]]]), 1.0, truth)  # one right, one wrong
    assert meter.take("log")["s"].accuracy == pytest.approx(50.0)
    meter.add("s", torch.tensor([[[0, 1]]]), 1.0, truth)  # both right
    assert meter.take("log")["s"].accuracy == pytest.approx(100.0)
    assert meter.take("eval")["s"].accuracy == pytest.approx(75.0)  # both steps
    assert meter.take("eval") == {}
    meter.add("s", torch.tensor([[[0, 1]]]), 1.0, None)  # no masks: nothing counted
    assert meter.take("log") == {}


def test_unlabeled_masks_follow_the_image_and_change_nothing_else(tmp_path):
    """Each pixel's colour encodes its class, so the mask cropped with the image can be checked against
    the augmented image; the six usual items are the same with and without the mask."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    lines = []
    for i in range(3):
        mask = rng.integers(0, 3, size=(5, 7)).repeat(4, 0).repeat(4, 1).astype(np.uint8)  # 20 x 28 blocks
        mask[:4, :4] = 255
        image = np.stack([mask.astype(int) * 60 % 256] * 3, axis=-1).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "mask" / f"{i}.png")
        lines.append(f"img/{i}.png mask/{i}.png\n")
    (tmp_path / "u.txt").write_text("".join(lines))
    kwargs = dict(nclass=3, crop_size=24)
    with_truth = SeededDataset(
        SemiDataset(str(tmp_path), "train_u", str(tmp_path / "u.txt"), truth=True, **kwargs)
    )
    without = SeededDataset(SemiDataset(str(tmp_path), "train_u", str(tmp_path / "u.txt"), **kwargs))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for seed in range(8):
        sample, plain = with_truth[(seed % 3, seed)], without[(seed % 3, seed)]
        assert len(sample) == 7 and len(plain) == 6
        for a, b in zip(sample[:TRUTH], plain):
            assert torch.equal(a, b)
        truth, ignore_mask, weak = sample[TRUTH], sample[3], sample[0]
        grey = ((weak[0] * std[0] + mean[0]) * 255).round()
        # away from block edges (a pixel whose 8 neighbours share its class) the bilinear image shows
        # exactly the class's colour
        padded = torch.nn.functional.pad(truth[None, None].float(), (1, 1, 1, 1), value=-1)[0, 0]
        neighbours = padded.unfold(0, 3, 1).unfold(1, 3, 1).flatten(2)
        interior = (neighbours == truth[..., None]).all(-1) & (ignore_mask != 255) & (truth != 255)
        assert interior.sum() > 20
        assert ((grey - (truth * 60 % 256)).abs() <= 2)[interior].all()
        assert (truth[ignore_mask == 255] == 255).all()  # crop padding has no mask


# ------------------------------------------------------------------ masks never reach a loss
METHODS = [
    ("unimatch", "UniMatch", []),
    ("UCCL", "UCCL", []),
    ("MLCL", "MLCL", []),
    ("CTT", "CTT", ["ctt.ct_thresh=0.0"]),  # a CT weight above 0 on an untrained network
    ("DUEB", "DUEB", []),
    ("CISCR", "OnlineCISCR", ["ciscr.mode=online"]),
]


def first_batch(method, cfg):
    data = method.training_data(pin_memory=False, save_path=None)
    return next(iter(data.batches(0)))


def run_step(module, cls_name, cfg, batch):
    """A fresh method (networks built from the same seed) takes one step on `batch`: its loss terms,
    every trained parameter's gradient and the pseudo-label counts it recorded."""
    torch.manual_seed(0)
    method_cls = getattr(importlib.import_module(module), cls_name)
    method = method_cls(cfg, build_labeled_criterion(cfg), torch.device("cpu"))
    nets = method.networks()
    method.attach(nets.all, nets.all)
    for net in nets.trained.values():
        net.train()
    losses, _ = method.step(copy.deepcopy(batch))
    sum(losses.values()).backward()
    grads = [p.grad.clone() for net in nets.trained.values() for p in net.parameters() if p.grad is not None]
    return losses, grads, dict(method.pseudo_labels.counts["eval"])


@pytest.mark.parametrize("module,cls_name,overrides", METHODS, ids=[m[1] for m in METHODS])
def test_unlabeled_masks_reach_no_loss(tiny_config, module, cls_name, overrides):
    from util.engine.trainer import prepare_demo_data

    # thresholds at 0: every pixel is trained on, so a mask reaching a loss would change it
    cfg = load_config(tiny_config, ["batch_size=2", "num_workers=0", "conf_thresh=0.0", *overrides])
    prepare_demo_data(cfg)
    torch.manual_seed(0)
    method_cls = getattr(importlib.import_module(module), cls_name)
    batch = first_batch(method_cls(cfg, build_labeled_criterion(cfg), torch.device("cpu")), cfg)
    assert set(batch["truth"]) == ({"unlabeled"} | ({"mix"} if "mix" in batch else set()))

    g = torch.Generator().manual_seed(1)
    other = {k: torch.randint(0, cfg["nclass"], v.shape, generator=g) for k, v in batch["truth"].items()}
    losses_a, grads_a, counts_a = run_step(module, cls_name, cfg, batch)
    losses_b, grads_b, counts_b = run_step(module, cls_name, cfg, {**batch, "truth": other})
    assert losses_a.keys() == losses_b.keys()
    for name in losses_a:
        assert torch.equal(losses_a[name], losses_b[name]), name
    assert len(grads_a) == len(grads_b) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # the masks are read, for the measurement only
    assert counts_a and counts_a.keys() == counts_b.keys()
    assert any(not torch.equal(counts_a[k], counts_b[k]) for k in counts_a)
