"""The UniMatch step against a direct, pixel-by-pixel computation: labeled cross-entropy, and confident
cross-entropy on the CutMixed strong views (targets pasted from the mix image's eval-mode prediction) and
on the feature-perturbed weak view, divided by the number of not-padding pixels; the supervised step; and
the per-pixel reference (tests/pointwise.py) that the UCCL, MLCL and online CISC-R step tests build on."""

import math

import pytest
import torch
from torch import nn

from model.semseg.deeplabv3plus import SegmentationOutput
from tests.conftest import make_method
from unimatch import UniMatch, cutmix, sample_to_grid
from util.config import defaults
from util.losses import cross_entropy


class PointwiseModel(nn.Module):
    """A 1x1 conv with the segmentation model's call signature; its 'feature perturbation' is a fixed
    scaling so the test can recompute everything by hand. Its feature maps are the input itself."""

    def __init__(self, nclass):
        super().__init__()
        self.conv = nn.Conv2d(3, nclass, 1)

    def forward(self, x, features=False, perturb=False):
        logits = self.conv(x)
        if not features:
            return logits
        num_fp = x.shape[0] if perturb is True else int(perturb)  # the last num_fp images
        logits_fp = self.conv(x[x.shape[0] - num_fp :] * 0.5) if num_fp else None
        return SegmentationOutput(logits, logits, x, x, x, logits_fp)


def log_softmax_at(logits, b, y, x, c):
    values = [logits[b, k, y, x].item() for k in range(logits.shape[1])]
    top = max(values)
    return values[c] - top - math.log(sum(math.exp(v - top) for v in values))


def argmax_conf(logits, b, y, x):
    values = [logits[b, k, y, x].item() for k in range(logits.shape[1])]
    top = max(values)
    probs = [math.exp(v - top) for v in values]
    total = sum(probs)
    best = max(range(len(values)), key=lambda k: probs[k])
    return best, probs[best] / total


def make_batch(B=2, H=4, W=4, K=3, seed=0, padded_rows=1, rectangles=False):
    """A random batch: labels with one ignored pixel, `padded_rows` padded bottom rows, and CutMix boxes
    that are random pixel sets or, with `rectangles`, one H/2 x W/2 rectangle (the same for every image)."""
    g = torch.Generator().manual_seed(seed)
    img_x = torch.randn(B, 3, H, W, generator=g)
    mask_x = torch.randint(0, K, (B, H, W), generator=g)
    mask_x[0, 0, 0] = 255

    def box():
        if not rectangles:
            return torch.randint(0, 2, (B, H, W), generator=g)
        box = torch.zeros(B, H, W, dtype=torch.long)
        top, left = torch.randint(0, min(H, W) // 2, (2,), generator=g).tolist()
        box[:, top : top + H // 2, left : left + W // 2] = 1
        return box

    def unlabeled():
        imgs = [torch.randn(B, 3, H, W, generator=g) for _ in range(3)]
        ignore = torch.zeros(B, H, W, dtype=torch.long)
        ignore[:, -padded_rows:, :] = 255
        return (*imgs, ignore, box(), box())

    return {"labeled": (img_x, mask_x), "unlabeled": unlabeled(), "mix": unlabeled()}


@pytest.mark.parametrize("thresh", [0.0, 0.5, 0.9])
def test_unimatch_loss_equals_hand_computation(thresh):
    torch.manual_seed(0)
    K = 3
    model = PointwiseModel(K)
    with torch.no_grad():
        model.conv.weight.mul_(4)  # spread the confidences over (0, 1)
    cfg = {**defaults(), "conf_thresh": thresh}
    method = make_method(UniMatch, model, cfg, cross_entropy)
    batch = make_batch(K=K)
    losses, stats = method.step(batch)

    img_x, mask_x = batch["labeled"]
    u_w, u_s1, u_s2, ign, box1, box2 = batch["unlabeled"]
    m_w, m_s1, m_s2, ign_m, _, _ = batch["mix"]
    with torch.no_grad():
        z_x, z_w, z_fp, z_m = model(img_x), model(u_w), model(u_w * 0.5), model(m_w)
    B, H, W = mask_x.shape

    # Labeled: mean CE over non-ignored pixels.
    ce = [-log_softmax_at(z_x, b, y, x, mask_x[b, y, x].item())
          for b in range(B) for y in range(H) for x in range(W) if mask_x[b, y, x] != 255]  # fmt: skip
    loss_x = sum(ce) / len(ce)

    def strong_loss(img_s, img_s_mix, box):
        with torch.no_grad():
            z_s = model(torch.where(box.bool().unsqueeze(1), img_s_mix, img_s))
        total, valid = 0.0, 0
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    src_logits, src_ign = (z_m, ign_m) if box[b, y, x] else (z_w, ign)
                    label, conf = argmax_conf(src_logits, b, y, x)
                    if src_ign[b, y, x] == 255:
                        continue
                    valid += 1
                    if conf >= thresh:
                        total += -log_softmax_at(z_s, b, y, x, label)
        return total / valid

    loss_s1 = strong_loss(u_s1, m_s1, box1)
    loss_s2 = strong_loss(u_s2, m_s2, box2)
    total, valid, confident = 0.0, 0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if ign[b, y, x] == 255:
                    continue
                valid += 1
                label, conf = argmax_conf(z_w, b, y, x)
                if conf >= thresh:
                    confident += 1
                    total += -log_softmax_at(z_fp, b, y, x, label)
    loss_fp = total / valid

    assert losses["x"].item() == pytest.approx(loss_x / 2, rel=1e-5)
    assert losses["s1"].item() == pytest.approx(loss_s1 * 0.25 / 2, rel=1e-5)
    assert losses["s2"].item() == pytest.approx(loss_s2 * 0.25 / 2, rel=1e-5)
    assert losses["fp"].item() == pytest.approx(loss_fp * 0.5 / 2, rel=1e-5)
    assert stats["mask_ratio"].dim() == 0, "a tensor: the engine converts it in its one host sync"
    assert stats["mask_ratio"].item() == pytest.approx(confident / valid)


def test_unimatch_gradients_skip_pseudo_labels():
    """Pseudo-labels are detached: the loss gradient equals the gradient with constant targets."""
    model = PointwiseModel(3)
    method = make_method(UniMatch, model, {**defaults(), "conf_thresh": 0.0}, cross_entropy)
    losses, _ = method.step(make_batch())
    sum(losses.values()).backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_cutmix_pastes_inside_box_only():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    box = torch.zeros(2, 4, 4, dtype=torch.long)
    box[0, 1:3, 1:3] = 1
    mixed = cutmix(a, b, box)
    assert mixed[0, :, 1:3, 1:3].eq(1).all() and mixed.sum() == 3 * 4
    labels = cutmix(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), 7), box)
    assert labels.sum() == 7 * 4


def test_sample_to_grid_is_stride_4_subsampling_for_4h_minus_3():
    mask = torch.arange(2 * 13 * 9).reshape(2, 13, 9)  # 13 = 4*4 - 3, 9 = 4*3 - 3
    torch.testing.assert_close(sample_to_grid(mask, (4, 3)), mask[:, ::4, ::4])


def test_predict_views_and_weak_view_of_cutmixed_content():
    from model.semseg.deeplabv3plus import DeepLabV3Plus

    torch.manual_seed(0)
    model = DeepLabV3Plus("resnet18", nclass=3, dilations=(1, 2, 3), width=8, head_channels=16)
    method = make_method(UniMatch, model, {**defaults(), "conf_thresh": 0.5}, cross_entropy)
    batch = make_batch(B=2, H=33, W=33, K=3)
    p = method.predict(batch)
    _, _, _, ignore, box1, box2 = batch["unlabeled"]
    ignore_mix = batch["mix"][3]
    assert len(p.strong_views) == 2
    assert p.weak.decoder.shape == p.mix.decoder.shape == p.strong_views[0].decoder.shape == (2, 16, 9, 9)
    assert p.weak.encoder.shape == (2, 16, 3, 3) and p.strong_views[1].logits_low.shape == (2, 3, 9, 9)
    assert p.weak.decoder.requires_grad and not p.mix.decoder.requires_grad
    assert not p.weak.logits.requires_grad and p.weak.logits_fp.requires_grad
    assert p.strong_views[0].logits.requires_grad and p.strong_views[0].logits_fp is None

    # Each strong view's targets: the weak ones outside its box, the mix view's inside it.
    for view, box in zip(p.strong_views, (box1, box2)):
        assert view.cutmix_box is box
        inside = box.bool()
        assert torch.equal(view.pseudo_label[inside], p.mix.pseudo_label[inside])
        assert torch.equal(view.pseudo_label[~inside], p.weak.pseudo_label[~inside])
        assert torch.equal(view.confidence[inside], p.mix.confidence[inside])
        assert torch.equal(view.ignore_mask, torch.where(inside, ignore_mix, ignore))
    conf, label = p.weak.logits.softmax(1).max(1)
    assert torch.equal(p.weak.pseudo_label, label) and torch.equal(p.weak.confidence, conf)

    weak = p.weak_cutmixed(p.strong_views[0], "decoder")
    inside = box1[:, ::4, ::4].bool().unsqueeze(1).expand_as(weak)  # 33 = 4*9 - 3: every 4th pixel
    torch.testing.assert_close(weak[inside], p.mix.decoder[inside])
    torch.testing.assert_close(weak[~inside], p.weak.decoder[~inside])
    # at another size, both parts are resized first
    enc = p.weak_cutmixed(p.strong_views[1], "encoder", size=(9, 9))
    assert enc.shape == (2, 16, 9, 9)


def test_supervised_step_is_the_labeled_cross_entropy_and_reads_no_unlabeled_batch():
    from supervised import Supervised
    from tests.pointwise import PointwiseNet, ce, pixels, vec

    net = PointwiseNet(nclass=3, seed=4)
    method = make_method(Supervised, net, defaults(), cross_entropy)
    batch = make_batch(B=2, H=4, W=5, K=3, seed=2)
    losses, _ = method.step({"labeled": batch["labeled"]})  # no 'unlabeled' or 'mix' stream

    img_x, mask_x = batch["labeled"]
    with torch.no_grad():
        logits = net(img_x)
    terms = [ce(vec(logits, *p), int(mask_x[p])) for p in pixels(mask_x) if mask_x[p] != 255]
    assert len(terms) == mask_x.numel() - 1  # make_batch ignores one labeled pixel
    assert set(losses) == {"x"}
    assert losses["x"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_pointwise_reference_of_the_unimatch_step():
    """The loop reference the UCCL, MLCL and online CISC-R step tests build on gives UniMatch's step."""
    from tests.pointwise import PointwiseNet, UniMatchReference, assert_terms, mix_padded_elsewhere

    net = PointwiseNet(nclass=3, seed=5)
    method = make_method(UniMatch, net, {**defaults(), "conf_thresh": 0.6}, cross_entropy)
    batch = mix_padded_elsewhere(make_batch(B=2, H=4, W=5, K=3, seed=6))
    losses, _ = method.step(batch)
    reference = UniMatchReference(net, batch)
    reference.assert_informative(0.6)
    assert_terms(losses, reference.terms(0.6))
