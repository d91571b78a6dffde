"""UCCL: SBU and CKR against direct loop computations of their formulas (paper and released variants),
their gradient paths, the whole step on a per-pixel network against loops, the step's forward passes, and
a two-process run that resumes."""

import math
import sys

import pytest
import torch

from tests.conftest import make_method
from tests.test_training import TINY, run, weights
from tests.test_unimatch_step import make_batch
from UCCL import UCCL
from util.config import ConfigError, defaults, load_config
from util.losses import cross_entropy
from util.losses.uccl import ckr_loss, sbu_loss


def tiny_inputs(seed=0, B=2, C=4, K=3, h=5, w=6, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    feat_weak = torch.rand(B, C, h, w, generator=g)  # non-negative, like post-ReLU features
    feat_strong = torch.rand(B, C, h, w, generator=g)
    logits_weak = torch.randn(B, K, h, w, generator=g) * scale
    logits_strong = torch.randn(B, K, h, w, generator=g) * scale
    valid = torch.rand(B, h, w, generator=g) > 0.2
    return feat_weak, feat_strong, logits_weak, logits_strong, valid


# ---------------------------------------------------------------- loop references, one pixel at a time
def vec(t, b, i, j):
    return [float(v) for v in t[b, :, i, j]]


def softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-6)


def sbu_reference(fw, fs, zw, zs, valid, thresh, sign, released):
    B, K, h, w = zw.shape
    pixels = [(i, j) for i in range(h) for j in range(w)]
    total = 0.0
    for b in range(B):
        prob_w = {p: softmax(vec(zw, b, *p)) for p in pixels}
        prob_s = {p: softmax(vec(zs, b, *p)) for p in pixels}
        label = {p: max(range(K), key=lambda c: prob_w[p][c]) for p in pixels}
        ce = {p: -math.log(prob_s[p][label[p]]) for p in pixels}
        sim = {p: sign * cosine(vec(fw, b, *p), vec(fs, b, *p)) for p in pixels}
        acc, n = 0.0, 0
        for c in range(K):
            region = [
                p
                for p in pixels
                if label[p] == c
                and valid[b, p[0], p[1]]
                # uncertain: the weak view (released), or either view (paper)
                and (max(prob_w[p]) <= thresh or (not released and max(prob_s[p]) <= thresh))
            ]
            if not region:
                continue
            n += 1
            if released:  # softmax over all h*w positions of S * [p in region]
                z = sum(math.exp(sim[p] if p in region else 0.0) for p in pixels)
                acc += sum(
                    ce[p] * math.exp(sim[p] if p in region else 0.0) / z
                    for p in pixels
                    if valid[b, p[0], p[1]]
                )
            else:  # softmax of S inside the region, CE on the region only
                z = sum(math.exp(sim[p]) for p in region)
                acc += sum(ce[p] * math.exp(sim[p]) / z for p in region)
        total += acc / n if n else 0.0
    return total / B


def ckr_reference(fw, fs, zw, valid, released):
    B, K, h, w = zw.shape
    pixels = [(i, j) for i in range(h) for j in range(w)]
    cos_sum, count = 0.0, 0
    for b in range(B):
        logits = {p: vec(zw, b, *p) for p in pixels}
        label = {p: max(range(K), key=lambda c: logits[p][c]) for p in pixels}
        region_w, region_s = {}, {}
        for c in range(K):
            region = [p for p in pixels if label[p] == c and valid[b, p[0], p[1]]]
            if not region:
                continue
            if released:  # softmax over the region of the raw logit of class c
                weight = dict(zip(region, softmax([logits[p][c] for p in region])))
            else:  # the weak probability of class c, normalised over the region
                prob = {p: softmax(logits[p])[c] for p in region}
                weight = {p: prob[p] / sum(prob.values()) for p in region}
            for feats, out in ((fw, region_w), (fs, region_s)):
                r = [sum(weight[p] * vec(feats, b, *p)[ch] for p in region) for ch in range(feats.shape[1])]
                for p in pixels:
                    if label[p] == c:
                        out[p] = r
        for p in pixels:
            if valid[b, p[0], p[1]]:
                cos_sum += cosine(region_w[p], region_s[p])
                count += 1
            elif released:  # padded pixels keep their own features and count
                cos_sum += cosine(vec(fw, b, *p), vec(fs, b, *p))
                count += 1
    return 1 - cos_sum / count


# ---------------------------------------------------------------- the losses against the references
@pytest.mark.parametrize("released", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("thresh", [0.6, 0.9])
def test_sbu_matches_loop_reference(released, sign, thresh):
    fw, fs, zw, zs, valid = tiny_inputs(seed=int(thresh * 10) + int(sign))
    expected = sbu_reference(fw, fs, zw, zs, valid, thresh, sign, released)
    got = sbu_loss(fw, fs, zw, zs, valid, thresh, sign, released)
    assert expected > 0
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_sbu_paper_and_released_differ_and_empty_is_zero():
    fw, fs, zw, zs, valid = tiny_inputs(seed=3)
    paper, released = (
        sbu_loss(fw, fs, zw, zs, valid, 0.7),
        sbu_loss(fw, fs, zw, zs, valid, 0.7, released=True),
    )
    assert abs(paper.item() - released.item()) > 1e-3
    # Cityscapes as released: conf_thresh 0 leaves no uncertain pixel, so SBU is exactly 0
    assert sbu_loss(fw, fs, zw, zs, valid, 0.0, released=True).item() == 0.0


def test_sbu_uncertain_when_either_view_is_unsure():
    """One pixel, classes 0/1: its weak prediction is sure of class 0 (p = 0.99), its strong one is not
    (0.5), or the other way round. Paper: uncertain either way, so SBU is the strong CE of class 0 there;
    released: uncertain only when the weak view is unsure."""
    feat = torch.ones(1, 2, 1, 1)
    sure, unsure = torch.tensor([4.6, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    for weak, strong in ((sure, unsure), (unsure, sure)):
        ce = torch.nn.functional.cross_entropy(strong, torch.zeros(1, 1, 1, dtype=torch.long))
        assert sbu_loss(feat, feat, weak, strong, valid, 0.9).item() == pytest.approx(ce.item())
    assert sbu_loss(feat, feat, sure, unsure, valid, 0.9, released=True).item() == 0.0
    # both views sure: no uncertain pixel
    assert sbu_loss(feat, feat, sure, sure, valid, 0.9).item() == 0.0


@pytest.mark.parametrize("released", [False, True])
def test_ckr_matches_loop_reference(released):
    for seed in range(3):
        fw, fs, zw, _, valid = tiny_inputs(seed=seed)
        expected = ckr_reference(fw, fs, zw, valid, released)
        got = ckr_loss(fw, fs, zw, valid, released)
        assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ckr_released_weights_stay_finite_with_large_logits():
    fw, fs, zw, _, valid = tiny_inputs(seed=1, scale=300.0)
    got = ckr_loss(fw, fs, zw, valid, released=True)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ckr_reference(fw, fs, zw, valid, True), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- gradient paths
def grads(loss_fn, released):
    fw, fs, zw, zs, valid = (t.requires_grad_() if t.is_floating_point() else t for t in tiny_inputs())
    loss = loss_fn(fw, fs, zw, zs, valid, released)
    names = ("feat_weak", "feat_strong", "logits_weak", "logits_strong")
    got = torch.autograd.grad(loss, [fw, fs, zw, zs], allow_unused=True)
    return {n for n, g in zip(names, got) if g is not None and g.abs().sum() > 0}


def test_gradient_paths():
    def sbu(fw, fs, zw, zs, valid, released):
        return sbu_loss(fw, fs, zw, zs, valid, 0.9, -1.0, released)

    def ckr(fw, fs, zw, zs, valid, released):
        return ckr_loss(fw, fs, zw, valid, released)

    # paper: the weak view is the teacher, the similarity weights are constants
    assert grads(sbu, released=False) == {"logits_strong"}
    assert grads(ckr, released=False) == {"feat_strong"}
    # released: the similarity is not detached from the strong features, nor are the CKR weights from the
    # weak logits
    assert grads(sbu, released=True) == {"logits_strong", "feat_strong"}
    assert grads(ckr, released=True) == {"feat_strong", "logits_weak"}


# ---------------------------------------------------------------- the step
def uccl_cfg(**uccl):
    cfg = {
        **defaults(),
        "conf_thresh": 0.5,
        "uccl": {
            "sbu_weight": 0.015,
            "ckr_weight": 0.02,
            "uncertain_thresh": 0.95,
            "sbu": "paper",
            "ckr": "paper",
            "feature": "encoder",
            "similarity": "positive",
            "weak_view": "pasted",
        },
    }
    cfg["uccl"].update(uccl)
    return cfg


def tiny_model():
    from model.semseg.deeplabv3plus import DeepLabV3Plus

    torch.manual_seed(0)
    return DeepLabV3Plus("resnet18", nclass=3, dilations=(1, 2, 3), width=8, head_channels=16)


@pytest.mark.parametrize(
    "switches, forwards",
    [
        ({}, 3),
        ({"feature": "decoder", "sbu": "released", "ckr": "released"}, 3),
        ({"weak_view": "forward"}, 5),
    ],
)
def test_step_adds_both_terms_with_no_extra_forward(switches, forwards):
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    method = make_method(UCCL, model, uccl_cfg(**switches), cross_entropy)
    losses, _ = method.step(make_batch(B=2, H=33, W=33, K=3))
    assert set(losses) == {"x", "s1", "s2", "fp", "sbu", "ckr"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["ckr"] > 0
    # UniMatch's three passes (mix, labeled + weak with FP, two strong views); only the released
    # weak_view=forward adds its two CutMixed weak images
    assert len(calls) == forwards
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "switches",
    [{}, {"sbu": "released", "ckr": "released", "similarity": "negative", "weak_view": "forward"}],
)
def test_step_terms_equal_the_loop_reference_on_both_strong_views(switches):
    """UniMatch's four terms, then SBU and CKR of each strong view k against the weak view of the same
    content (u_w with box k pasted from the mix image), each weight on its own term, the two views
    averaged. The weights and thresholds differ, so that swapping any two of them changes the numbers."""
    from tests.pointwise import PointwiseNet, UniMatchReference, assert_terms, mix_padded_elsewhere

    net = PointwiseNet(nclass=3, seed=2)
    cfg = uccl_cfg(sbu_weight=0.3, ckr_weight=0.7, uncertain_thresh=0.8, **switches)  # conf_thresh 0.5
    method = make_method(UCCL, net, cfg, cross_entropy)
    batch = mix_padded_elsewhere(make_batch(B=2, H=4, W=5, K=3, seed=3))
    losses, _ = method.step(batch)

    released_sbu, released_ckr = switches.get("sbu") == "released", switches.get("ckr") == "released"
    thresh = 0.5 if released_sbu else 0.8  # the released SBU reads conf_thresh
    sign = -1.0 if switches.get("similarity") == "negative" else 1.0
    reference = UniMatchReference(net, batch)
    reference.assert_informative(0.5)
    expected = reference.terms(0.5)
    sbu, ckr = [], []
    for k in (0, 1):
        # a forward of the CutMixed weak image (weak_view=forward) gives the pasted maps: the net is pointwise
        feat_weak, logits_weak = reference.weak_of_strong(k, 0), reference.weak_of_strong(k, 1)
        feat_strong, logits_strong, _ = reference.maps["strong"][k]
        valid = torch.zeros(feat_weak.shape[0], *feat_weak.shape[2:], dtype=torch.bool)
        for p, (_, _, ok) in reference.strong[k].items():
            valid[p] = ok
        sbu.append(
            sbu_reference(
                feat_weak, feat_strong, logits_weak, logits_strong, valid, thresh, sign, released_sbu
            )
        )
        ckr.append(ckr_reference(feat_weak, feat_strong, logits_weak, valid, released_ckr))
    assert all(v > 0 for v in sbu + ckr)
    expected["sbu"] = 0.3 * (sbu[0] + sbu[1]) / 2
    expected["ckr"] = 0.7 * (ckr[0] + ckr[1]) / 2
    assert_terms(losses, expected)


def test_uccl_config_section_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(TINY.format(root=tmp_path))
    cfg = load_config(str(path))
    assert cfg["uccl"]["sbu"] == "paper" and cfg["uccl"]["feature"] == "encoder"
    with pytest.raises(ConfigError, match="uccl.sbu' must be one of"):
        load_config(str(path), ["uccl.sbu=fixed"])
    with pytest.raises(ConfigError, match="uccl.uncertain_thresh' must lie in"):
        load_config(str(path), ["uccl.uncertain_thresh=1.5"])
    with pytest.raises(ConfigError, match="did you mean 'uccl.ckr_weight'"):
        load_config(str(path), ["uccl.ckr_wieght=1"])


def test_two_process_uccl_run_resumes_to_identical_weights(tiny_config, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = [*torchrun, "tests/run_training.py", "UCCL", "--config", tiny_config, "uccl.similarity=negative"]
    run([*script, "--save-path", str(tmp_path / "straight")])
    # killed after the checkpoint of iteration 4, then the same command again
    run([*script, "--save-path", str(tmp_path / "crashed"), "--crash-at", "5"], expect=1)
    log = run([*script, "--save-path", str(tmp_path / "crashed")])
    assert "resumed from" in log and "at iteration 4/6" in log
    a, b = weights(tmp_path / "straight" / "latest.pth"), weights(tmp_path / "crashed" / "latest.pth")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed two-process run ended with different weights"
