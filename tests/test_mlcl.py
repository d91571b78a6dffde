"""MLCL: every term against a direct, loop-based computation of its formula, the prototype memory
(EMA, ranks, checkpoints), SAI's adaptive strength, gradient reach, the whole step on a per-pixel network
against loops, and real runs."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from MLCL import MLCL
from tests import mlcl_ranks
from tests.conftest import make_method, method_section
from tests.test_training import TINY, run, weights
from tests.test_unimatch_step import make_batch
from util.config import ConfigError, defaults, load_config
from util.losses import cross_entropy
from util.losses import mlcl as M


# ------------------------------------------------------------------------------------- loop references
def cos(a, b):
    """Cosine of two vectors, one coordinate at a time; 0 when either is the zero vector."""
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


def rows(t):
    return [[float(v) for v in row] for row in t]


def reference_prototype_loss(weak, strong, labels, conf, valid, memory, initialised, n, m, thresh,
                             pairing, selection, denominator):  # fmt: skip
    """The prototype term with lists, class by class: anchor selection (most similar confident weak
    pixels), strong-sample selection (least similar strong pixels), then the nearest-sample loss."""
    weak, strong, memory = rows(weak), rows(strong), rows(memory)
    labels, conf, valid = labels.tolist(), conf.tolist(), valid.tolist()
    list_w, classes_w, list_s, classes_s = [], [], [], []
    for c in range(len(memory)):
        anchor_px = [i for i in range(len(weak)) if labels[i] == c and valid[i] and conf[i] > thresh]
        strong_px = [i for i in range(len(weak)) if labels[i] == c and valid[i]]
        proto = memory[c]
        if not initialised[c]:  # stand-in: the mean of the class's anchor candidates
            proto = [sum(weak[i][d] for i in anchor_px) / max(len(anchor_px), 1) for d in range(len(proto))]
        if anchor_px:
            ranked = sorted(anchor_px, key=lambda i: -cos(proto, weak[i]))  # most similar first
            count = min(n, len(anchor_px))
            if selection == "topk":
                chosen = ranked[:count]
            else:  # X[idx[-1]], then X[idx[-i]] for i in range(1, n)
                chosen = [ranked[0]] + [ranked[i - 1] for i in range(1, count)]
            list_w.append([weak[i] for i in chosen])
            classes_w.append(c)
        if strong_px:
            ranked = sorted(strong_px, key=lambda i: cos(proto, strong[i]))  # least similar first
            list_s.append([strong[i] for i in ranked[: min(m, len(strong_px))]])
            classes_s.append(c)
    total, count = 0.0, 0
    for i, c in enumerate(classes_w):
        samples = list_s[i] if pairing == "positional" else list_s[classes_s.index(c)]
        for a in list_w[i]:
            total += max(cos(a, s) for s in samples)
        count += len(samples) if denominator == "strong" else len(list_w[i])
    return 1 - total / count if count else 0.0


def reference_update_memory(memory, initialised, features, labels, mask, momentum, released):
    """The memory's EMA step, one class at a time in class order; the released variant stops moving
    initialised classes once a class has started in this call."""
    memory, initialised = rows(memory), list(initialised.tolist())
    need_update = True
    for c in sorted(set(labels.tolist())):
        px = [i for i in range(len(labels)) if labels[i] == c and mask[i]]
        if not px:
            continue
        mean = [sum(float(features[i][d]) for i in px) / len(px) for d in range(len(memory[c]))]
        if not initialised[c]:
            memory[c], initialised[c] = mean, True
            need_update = False
            continue
        if released and not need_update:
            continue
        memory[c] = [momentum * a + (1 - momentum) * b for a, b in zip(memory[c], mean)]
    return torch.tensor(memory), torch.tensor(initialised)


def proto_case(seed=0, N=40, K=4, C=5):
    """Pixels of K classes: class 1 uninitialised, class 2 has no confident pixel, class 3 few."""
    g = torch.Generator().manual_seed(seed)
    weak, strong = torch.rand(N, C, generator=g), torch.rand(N, C, generator=g)
    labels = torch.arange(N) % K
    conf = 0.5 + 0.5 * torch.rand(N, generator=g)
    conf[labels == 2] = 0.3
    conf[(labels == 3) & (torch.arange(N) > 12)] = 0.1  # class 3: anchors at pixels 3, 7, 11 only
    valid = torch.ones(N, dtype=torch.bool)
    valid[::7] = False
    memory = torch.rand(K, C, generator=g)
    initialised = torch.tensor([True, False, True, True])
    return weak, strong, labels, conf, valid, memory, initialised


# ------------------------------------------------------------------------------------------------- FKA
def test_point_to_point_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    weak = torch.rand(2, 3, 3, 4, generator=g).requires_grad_()
    strong = torch.rand(2, 3, 3, 4, generator=g).requires_grad_()
    with torch.no_grad():
        strong[1, :, 0, 0] = 0  # a dead (all-zero, post-ReLU) pixel has cosine 0
    valid = torch.rand(2, 3, 4, generator=g) > 0.3
    loss = M.point_to_point_loss(weak, strong, valid)
    sims = [cos(weak[b, :, y, x].tolist(), strong[b, :, y, x].tolist())
            for b in range(2) for y in range(3) for x in range(4) if valid[b, y, x]]  # fmt: skip
    assert loss.item() == pytest.approx(1 - sum(sims) / len(sims), abs=1e-6)
    loss.backward()
    assert weak.grad is None, "the weak features are the target: detached"
    assert strong.grad.abs().sum() > 0
    assert strong.grad[~valid.unsqueeze(1).expand_as(strong)].abs().max() == 0, "padding gets no gradient"


@pytest.mark.parametrize("pairing", ["class", "positional"])
@pytest.mark.parametrize("selection", ["topk", "released"])
@pytest.mark.parametrize("denominator", ["anchors", "strong"])
def test_prototype_loss_matches_loop(pairing, selection, denominator):
    weak, strong, labels, conf, valid, memory, initialised = proto_case()
    loss, n_classes = M.fka_prototype_loss(
        weak, strong, labels, conf, valid, memory, initialised, 3, 4, 0.4, pairing, selection, denominator
    )
    expected = reference_prototype_loss(
        weak, strong, labels, conf, valid, memory, initialised, 3, 4, 0.4, pairing, selection, denominator
    )
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert int(n_classes) == 3  # class 2 has no confident pixel


def test_released_variants_change_the_loss():
    """Each released switch alone moves the value on a case where it matters (no accidental no-ops)."""
    case = proto_case()
    base = M.fka_prototype_loss(*case, 3, 4, 0.4)[0].item()
    for args in [
        ("positional", "topk", "anchors"),
        ("class", "released", "anchors"),
        ("class", "topk", "strong"),
    ]:
        assert M.fka_prototype_loss(*case, 3, 4, 0.4, *args)[0].item() != pytest.approx(base, abs=1e-4)


def test_positional_and_class_pairing_differ_exactly_when_a_class_lacks_anchors():
    weak, strong, labels, conf, valid, memory, initialised = proto_case(seed=1)

    def both(conf):
        return [M.fka_prototype_loss(weak, strong, labels, conf, valid, memory, initialised, 3, 4, 0.4, p)[0]
                for p in ("class", "positional")]  # fmt: skip

    every_class = conf.clone()
    every_class[labels == 2] = 0.9  # every class has anchors: the two pairings are the same
    a, b = both(every_class)
    assert a.item() == b.item()
    last_missing = every_class.clone()
    last_missing[labels == 3] = 0.1  # the last class has none: nothing after it to shift
    a, b = both(last_missing)
    assert a.item() == b.item()
    a, b = both(conf)  # class 2 has none: class 3's anchors meet class 2's strong samples
    assert abs(a.item() - b.item()) > 1e-4


def test_prototype_gradient_reaches_only_the_nearest_strong_sample_of_each_anchor():
    weak, strong, labels, conf, valid, memory, initialised = proto_case(seed=2)
    weak.requires_grad_()
    strong.requires_grad_()
    loss, _ = M.fka_prototype_loss(weak, strong, labels, conf, valid, memory, initialised, 3, 4, 0.4)
    loss.backward()
    assert weak.grad is None and not memory.requires_grad

    # The nearest strong sample of every anchor, found by loops as in the reference.
    nearest = set()
    for c in range(4):
        anchors = [i for i in range(40) if labels[i] == c and valid[i] and conf[i] > 0.4]
        pool = [i for i in range(40) if labels[i] == c and valid[i]]
        if not anchors:
            continue
        proto = memory[c].tolist() if initialised[c] else weak.detach()[anchors].mean(0).tolist()
        anchors = sorted(anchors, key=lambda i: -cos(proto, weak[i].tolist()))[:3]
        pool = sorted(pool, key=lambda i: cos(proto, strong[i].tolist()))[:4]
        for a in anchors:
            nearest.add(max(pool, key=lambda s: cos(weak[a].tolist(), strong[s].tolist())))
    reached = set(torch.nonzero(strong.grad.abs().sum(1)).flatten().tolist())
    assert reached == nearest


@pytest.mark.parametrize("released", [False, True])
def test_ema_update_matches_loop(released):
    g = torch.Generator().manual_seed(3)
    K, C, N = 5, 3, 30
    memory = torch.rand(K, C, generator=g)
    initialised = torch.tensor([True, False, True, False, True])
    memory[~initialised] = 0
    features = torch.rand(N, C, generator=g)
    labels = torch.randint(0, K, (N,), generator=g)
    labels[labels == 3] = 2  # class 3 absent: keeps its state
    mask = torch.rand(N, generator=g) > 0.2
    sums, counts = M.class_sums(features, labels, mask, K)
    new, flags = M.ema_update(memory, initialised, sums, counts, 0.9, released)
    exp_mem, exp_flags = reference_update_memory(memory, initialised, features, labels, mask, 0.9, released)
    torch.testing.assert_close(new, exp_mem, atol=1e-6, rtol=1e-5)
    assert flags.tolist() == exp_flags.tolist() == [True, True, True, False, True]
    if released:  # class 1 starts in this call: classes 2 and 4 keep their old rows, class 0 moves
        assert torch.equal(new[2], memory[2]) and torch.equal(new[4], memory[4])
        assert not torch.equal(new[0], memory[0])
    # PrototypeMemory (one process) takes the same step.
    bank = M.PrototypeMemory(K, C)
    bank.memory, bank.initialised = memory.clone(), initialised.clone()
    bank.update(features, labels, mask, 0.9, released)
    torch.testing.assert_close(bank.memory, exp_mem, atol=1e-6, rtol=1e-5)


def test_prototype_memory_cross_rank_average_under_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(mlcl_ranks.worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    (f0, l0, m0), (f1, l1, m1) = mlcl_ranks.rank_data(0), mlcl_ranks.rank_data(1)
    for released in (False, True):
        r0, r1 = (torch.load(tmp_path / f"rank{r}_released{released}.pt", weights_only=True) for r in (0, 1))
        assert torch.equal(r0["memory"], r1["memory"]) and torch.equal(r0["initialised"], r1["initialised"])
        assert r0["initialised"].tolist() == [True, True, True, False]
        if not released:  # one step on the global batch: what one process with both batches does
            one = M.PrototypeMemory(4, 3)
            one.memory, one.initialised = mlcl_ranks.start_memory()
            one.update(torch.cat([f0, f1]), torch.cat([l0, l1]), torch.cat([m0, m1]), 0.9)
            torch.testing.assert_close(r0["memory"], one.memory)
            # class 1 (rank 1 only) starts at rank 1's mean, not diluted by rank 0
            torch.testing.assert_close(r0["memory"][1], f1[l1 == 1].mean(0))
        else:  # per-rank steps, averaged: a class seen on one rank only is halved (averaged with zeros)
            memory, flags = mlcl_ranks.start_memory()
            a, _ = reference_update_memory(memory, flags, f0, l0, m0, 0.9, True)
            b, _ = reference_update_memory(memory, flags, f1, l1, m1, 0.9, True)
            torch.testing.assert_close(r0["memory"], (a + b) / 2)
            torch.testing.assert_close(r0["memory"][1], f1[l1 == 1].mean(0) / 2)


def test_prototype_memory_state_round_trip(tmp_path):
    bank = M.PrototypeMemory(81, 8)  # COCO's 81 classes fit
    bank.update(torch.rand(50, 8), torch.randint(0, 81, (50,)), torch.ones(50, dtype=torch.bool), 0.99)
    torch.save(bank.state_dict(), tmp_path / "m.pt")
    other = M.PrototypeMemory(81, 8)
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(other.memory, bank.memory) and torch.equal(other.initialised, bank.initialised)
    with pytest.raises(ValueError, match=r"shape \(81, 8\).*\(21, 8\)"):
        M.PrototypeMemory(21, 8).load_state_dict(bank.state_dict())


# ------------------------------------------------------------------------------------------------- SAI
def test_sai_strength_moves_with_similarity_and_the_released_collapse():
    v = torch.tensor([0.0, 0.5, 1.0])
    s = M.sai_strength(v)
    torch.testing.assert_close(s, torch.tensor([0.15, 0.225, 0.30]))
    feature = torch.ones(3, 1, 1, 1)
    widest = M.noise_injection(feature, s, torch.ones(3, 1, 1, 1)).flatten()  # u = 1: r = +s
    narrowest = M.noise_injection(feature, s, torch.zeros(3, 1, 1, 1)).flatten()  # u = 0: r = -s
    assert (widest - narrowest).diff().gt(0).all(), "noise range widens as v grows"
    # Masking: attention 0.005, 0.015, ..., 0.995 (peak 0.995); u = 0.5 puts the factor at 1 - s, so the
    # threshold is 0.995 * (0.85, 0.775, 0.70) = 0.846, 0.771, 0.697.
    ramp = torch.linspace(0.005, 0.995, 100, dtype=torch.float64).view(1, 1, 1, 100).expand(3, 2, 1, 100)
    kept = M.feature_masking(ramp, s.double(), torch.full((3,), 0.5)).ne(0).sum(dim=(1, 2, 3)) / 2
    assert kept.tolist() == [85, 77, 70], "higher similarity -> lower threshold -> more positions dropped"
    low = 1 - M.sai_strength(M.sai_strength(v)) - 0.1
    high = 1 - M.sai_strength(M.sai_strength(v)) + 0.1
    # released (noise and masking on): the factor is ~U(0.705..0.728, 0.905..0.928), almost CCT's U(0.7, 0.9)
    torch.testing.assert_close(low, torch.tensor([0.7275, 0.71625, 0.705]))
    torch.testing.assert_close(high, torch.tensor([0.9275, 0.91625, 0.905]))


def test_noise_and_masking_match_loop():
    g = torch.Generator().manual_seed(4)
    feature = torch.rand(2, 3, 2, 3, generator=g)
    strength = torch.tensor([0.2, 0.28])
    u = torch.rand(2, 3, 2, 3, generator=g)
    u_mask = torch.tensor([0.1, 0.9])
    noised = M.noise_injection(feature, strength, u)
    masked = M.feature_masking(feature, strength, u_mask)
    for b in range(2):
        att = [[sum(feature[b, c, y, x].item() for c in range(3)) / 3 for x in range(3)] for y in range(2)]
        thr = max(max(r) for r in att) * (1 - strength[b].item() - 0.1 + 0.2 * u_mask[b].item())
        for c in range(3):
            for y in range(2):
                for x in range(3):
                    r = -strength[b].item() + 2 * strength[b].item() * u[b, c, y, x].item()
                    assert noised[b, c, y, x].item() == pytest.approx(feature[b, c, y, x].item() * (1 + r))
                    keep = att[y][x] < thr
                    assert masked[b, c, y, x].item() == pytest.approx(feature[b, c, y, x].item() * keep)


def test_sai_weight_follows_the_released_ramp():
    table = {
        0: 4.54e-7,
        0.25: 3.6e-5,
        0.5: 8.2e-4,
        0.75: 5.4e-3,
        0.9: 9.0e-3,
        1: 0.01,
    }  # 0.01 exp(-10 (1-t)^2)
    for frac, value in table.items():
        assert M.sai_weight(0.01, int(frac * 1000), 1000) == pytest.approx(value, rel=0.03)


# --------------------------------------------------------------------------------------- the MLCL step
def tiny_method(**mlcl):
    from model.semseg.deeplabv3plus import DeepLabV3Plus

    torch.manual_seed(0)
    model = DeepLabV3Plus("resnet18", nclass=3, dilations=(1, 2, 3), width=8, head_channels=16)
    section = {**defaults()["mlcl"], "anchor_thresh": 0.0, "num_anchors": 3, "num_strong": 5, **mlcl}
    cfg = {**defaults(), "conf_thresh": 0.5, "nclass": 3, "head_channels": 16, "mlcl": section}
    method = make_method(MLCL, model, cfg, cross_entropy)
    method.iteration = method.total_iters = 10  # end of the ramp: SAI at its full weight
    return method


@pytest.mark.parametrize(
    "sai_feature, sai_strength", [("encoder", "single"), ("decoder", "single"), ("decoder", "released")]
)
def test_sai_losses_match_loop(sai_feature, sai_strength):
    method = tiny_method(sai_feature=sai_feature, sai_strength=sai_strength)
    batch = make_batch(B=2, H=17, W=17, K=3)
    p = method.predict(batch)
    torch.manual_seed(5)
    losses, _ = method.sai_losses(p)

    torch.manual_seed(5)  # replay the draws: noise (2B, C, h, w), then masking (2B,)
    level = sai_feature
    strong = torch.cat([view.feature(level) for view in p.strong_views]).detach()
    u_noise = torch.rand(strong.shape)
    u_mask = torch.rand(strong.shape[0])
    weak = torch.cat([p.weak_cutmixed(view, level) for view in p.strong_views]).detach()
    B2, C, h, w = strong.shape
    noised, masked = strong.clone(), strong.clone()
    for b in range(B2):
        v = sum(
            cos(weak[b, :, y, x].tolist(), strong[b, :, y, x].tolist()) for y in range(h) for x in range(w)
        )
        s = 0.15 * (1 + v / (h * w))
        noised[b] = strong[b] * (1 + (2 * u_noise[b] - 1) * s)
        s_mask = 0.15 * (1 + s) if sai_strength == "released" else s
        att = strong[b].mean(0)
        masked[b] = strong[b] * (att < att.max() * (1 - s_mask - 0.1 + 0.2 * u_mask[b])).float()
    box1, box2 = batch["unlabeled"][4], batch["unlabeled"][5]
    prob_w = p.weak.logits.softmax(1)
    prob_m = F.interpolate(p.mix.logits_low, (17, 17), mode="bilinear", align_corners=True).softmax(1)
    with torch.no_grad():
        for name, feature in (("noise", noised), ("mask", masked)):
            if level == "encoder":
                # The noise and mask copies go through the decoder as one batch of 4B rows, whose BN
                # statistics they share (train mode), so the reference decodes the same batch.
                low = torch.cat([view.low_level for view in p.strong_views])
                out = method.net.decode(torch.cat([low, low]), torch.cat([noised, masked]))
                out = out[:B2] if name == "noise" else out[B2:]
            else:
                out = feature
            prob = F.interpolate(method.net.classify(out), (17, 17), mode="bilinear", align_corners=True)
            prob = prob.softmax(1)
            total = 0.0
            for b in range(B2):
                box = (box1 if b < 2 else box2)[b % 2]
                for y in range(17):
                    for x in range(17):
                        target = (prob_m if box[y, x] else prob_w)[b % 2, :, y, x]
                        total += (prob[b, :, y, x] - target).pow(2).sum().item()
            expected = 0.01 * total / (B2 * 3 * 17 * 17)
            assert losses[name].item() == pytest.approx(expected, rel=1e-5)


def test_encoder_sai_leaves_running_statistics_to_the_real_images_unless_asked():
    """Encoder-level SAI decodes the perturbed features in train mode. By default the decoder's BN running
    statistics do not move in that pass (its output is the same: batch statistics normalise it either
    way); with sai_bn_update they take the perturbed batch, as before the switch existed."""
    batch = make_batch(B=2, H=33, W=33, K=3)

    def sai_pass(update):
        method = tiny_method(sai_feature="encoder", sai_bn_update=update)
        p = method.predict(batch)
        before = {k: v.clone() for k, v in method.net.state_dict().items()}
        torch.manual_seed(5)
        losses, _ = method.sai_losses(p)
        changed = {k for k, v in method.net.state_dict().items() if not torch.equal(v, before[k])}
        return losses, changed

    frozen_losses, frozen_changed = sai_pass(False)
    update_losses, update_changed = sai_pass(True)
    assert frozen_losses.keys() == update_losses.keys() == {"noise", "mask"}
    assert all(torch.equal(frozen_losses[k], update_losses[k]) for k in frozen_losses)
    assert frozen_changed == set()
    decoder_bn = {f"{layer}.{stat}" for layer in ("reduce.1", "fuse.0.1", "fuse.1.1")
                  for stat in ("running_mean", "running_var", "num_batches_tracked")}  # fmt: skip
    assert update_changed == decoder_bn
    # the BN layers are back to tracking afterwards
    method = tiny_method(sai_feature="encoder")
    method.sai_losses(method.predict(batch))
    assert all(m.track_running_stats for m in method.net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_mlcl_step_terms_and_gradient_reach():
    method = tiny_method(fka_feature="encoder", sai_feature="encoder")
    batch = make_batch(B=2, H=33, W=33, K=3)
    p = method.predict(batch)
    fka, stats = method.fka_losses(p)
    sai, _ = method.sai_losses(p)
    assert set(fka) == {"p2p", "proto"} and set(sai) == {"noise", "mask"}
    assert stats["proto_classes"] > 0 and method.prototypes.initialised.any()
    assert not method.prototypes.memory.requires_grad
    total = sum(fka.values()) + sum(sai.values())
    s1, s2 = p.strong_views
    weak = {"decoder": p.weak.decoder, "encoder": p.weak.encoder, "logits_low": p.weak.logits_low,
            "low_level": p.weak.low_level}  # fmt: skip
    strong = {"encoder 1": s1.encoder, "encoder 2": s2.encoder, "low_level 1": s1.low_level,
              "low_level 2": s2.low_level}  # fmt: skip
    grads = torch.autograd.grad(
        total, [*weak.values(), *strong.values()], allow_unused=True, retain_graph=True
    )
    for name, grad in zip(weak, grads[: len(weak)]):
        assert grad is None, f"weak {name}: the weak view is a target and gets no MLCL gradient"
    for name, grad in zip(strong, grads[len(weak) :]):
        assert grad is not None and grad.abs().sum() > 0, f"strong {name} gets no gradient"
    # The released decoder level: every MLCL term starts from the strong decoder features.
    method = tiny_method(fka_feature="decoder", sai_feature="decoder")
    p = method.predict(batch)
    for terms in (method.fka_losses(p)[0], method.sai_losses(p)[0]):
        g_w, g_mix, g_s1, g_s2 = torch.autograd.grad(
            sum(terms.values()), [p.weak.decoder, p.weak.logits_low, *(v.decoder for v in p.strong_views)],
            allow_unused=True, retain_graph=True,
        )  # fmt: skip
        assert g_w is None and g_mix is None and g_s1.abs().sum() > 0 and g_s2.abs().sum() > 0


def test_mlcl_step_returns_unimatch_terms_plus_weighted_mlcl_terms():
    method = tiny_method(p2p_weight=0.0, sai_mask=False)
    losses, stats = method.step(make_batch(B=2, H=33, W=33, K=3))
    assert set(losses) == {"x", "s1", "s2", "fp", "proto", "noise"}
    assert {"mask_ratio", "proto_classes", "sai_similarity", "sai_w"} <= set(stats)
    method = tiny_method(proto_weight=0.0, p2p_weight=0.0, sai_weight=0.0)
    losses, _ = method.step(make_batch(B=2, H=33, W=33, K=3))
    assert set(losses) == {"x", "s1", "s2", "fp"} and not method.prototypes.initialised.any()
    with pytest.raises(ValueError, match="prototype memory"):
        method.load_state_dict({})


def test_step_terms_and_memory_update_equal_the_loop_reference():
    """MLCL's whole step on a per-pixel network: UniMatch's terms; point-to-point alignment and prototype
    compactness of each strong view against the weak view of its content (u_w with its box pasted from
    the mix image), averaged over the two views; the memory's EMA step from the confident weak-view
    pixels; noise and masking of both strong views' features held to the pasted weak prediction.
    Every weight differs, so that swapping two of them changes the numbers."""
    from tests.pointwise import (
        PointwiseNet,
        UniMatchReference,
        assert_terms,
        mix_padded_elsewhere,
        pixels,
        softmax,
        vec,
    )

    K, C = 3, 4
    net = PointwiseNet(nclass=K, channels=C, seed=7)
    section = {**defaults()["mlcl"], "p2p_weight": 0.3, "proto_weight": 0.2, "sai_weight": 0.5,
               "anchor_thresh": 0.6, "num_anchors": 2, "num_strong": 3, "momentum": 0.9}  # fmt: skip
    cfg = {**defaults(), "conf_thresh": 0.5, "nclass": K, "head_channels": C, "mlcl": section}
    method = make_method(MLCL, net, cfg, cross_entropy)
    method.iteration = method.total_iters = 10  # the end of the ramp: SAI at its full weight
    g = torch.Generator().manual_seed(8)
    memory, initialised = torch.rand(K, C, generator=g), torch.tensor([True, False, True])
    method.prototypes.memory, method.prototypes.initialised = memory.clone(), initialised.clone()
    batch = mix_padded_elsewhere(make_batch(B=2, H=4, W=5, K=K, seed=9))
    torch.manual_seed(10)  # SAI's draws: noise of the features' shape (2B, C, H, W), then masking (2B,)
    losses, _ = method.step(batch)
    torch.manual_seed(10)
    B, H, W = batch["labeled"][1].shape
    u_noise, u_mask = torch.rand(2 * B, C, H, W), torch.rand(2 * B)

    reference = UniMatchReference(net, batch)

    reference.assert_informative(0.5)
    expected = reference.terms(0.5)
    p2p, proto, strong_all, weak_all, target_all = [], [], [], [], []
    for k in (0, 1):
        weak, strong = reference.weak_of_strong(k, 0), reference.maps["strong"][k][0]
        targets = reference.strong[k]
        valid = [p for p in pixels(weak) if targets[p][2]]
        p2p.append(1 - sum(cos(vec(weak, *p), vec(strong, *p)) for p in valid) / len(valid))
        order = pixels(weak)  # (b, y, x), the order of the flattened pixels
        proto.append(reference_prototype_loss(
            torch.tensor([vec(weak, *p) for p in order]), torch.tensor([vec(strong, *p) for p in order]),
            torch.tensor([targets[p][0] for p in order]), torch.tensor([targets[p][1] for p in order]),
            torch.tensor([targets[p][2] for p in order]), memory, initialised, 2, 3, 0.6,
            "class", "topk", "anchors",
        ))  # fmt: skip
        strong_all.append(strong)
        weak_all.append(weak)
        prob_weak = reference.maps["weak"][1].softmax(dim=1)
        prob_mix = reference.maps["mix"][1].softmax(dim=1)
        box = reference.boxes[k]
        target = torch.stack([(prob_mix if box[p] else prob_weak)[p[0], :, p[1], p[2]] for p in order])
        target_all.append(target.view(B, H, W, K).permute(0, 3, 1, 2))
    assert min(proto) > 0
    expected["p2p"] = 0.3 * (p2p[0] + p2p[1]) / 2
    expected["proto"] = 0.2 * (proto[0] + proto[1]) / 2

    strong, weak, target = torch.cat(strong_all), torch.cat(weak_all), torch.cat(target_all)
    weight, bias = net.classifier.weight.detach()[:, :, 0, 0].tolist(), net.classifier.bias.detach().tolist()
    sums = {"noise": 0.0, "mask": 0.0}
    for b in range(2 * B):
        similarity = sum(cos(vec(weak, b, y, x), vec(strong, b, y, x)) for y in range(H) for x in range(W))
        s = 0.15 * (1 + similarity / (H * W))
        attention = [[sum(vec(strong, b, y, x)) / C for x in range(W)] for y in range(H)]
        top = max(max(row) for row in attention) * (1 - s - 0.1 + 0.2 * float(u_mask[b]))
        for y in range(H):
            for x in range(W):
                feature = vec(strong, b, y, x)
                perturbed = {
                    "noise": [
                        f * (1 + (2 * float(u_noise[b, c, y, x]) - 1) * s) for c, f in enumerate(feature)
                    ],
                    "mask": [f * (attention[y][x] < top) for f in feature],
                }
                for name, f in perturbed.items():
                    logits = [bias[j] + sum(weight[j][c] * f[c] for c in range(C)) for j in range(K)]
                    prob = softmax(logits)
                    sums[name] += sum((prob[j] - float(target[b, j, y, x])) ** 2 for j in range(K))
    for name, total in sums.items():
        expected[name] = 0.5 * total / (2 * B * K * H * W)
    assert_terms(losses, expected)

    # the memory's EMA step: the weak view's confident (> anchor_thresh), not-padding pixels, after the loss
    weak_targets = reference.weak
    order = pixels(reference.maps["weak"][0])
    features = torch.tensor([vec(reference.maps["weak"][0], *p) for p in order])
    labels = torch.tensor([weak_targets[p][0] for p in order])
    confident = torch.tensor([weak_targets[p][2] and weak_targets[p][1] > 0.6 for p in order])
    assert confident.any() and not confident.all()
    expected_memory, expected_flags = reference_update_memory(
        memory, initialised, features, labels, confident, 0.9, False
    )
    torch.testing.assert_close(method.prototypes.memory, expected_memory, atol=1e-6, rtol=1e-5)
    assert method.prototypes.initialised.tolist() == expected_flags.tolist()


# -------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["pascal", "cityscapes", "coco", "demo"])
def test_configs_state_only_what_differs_from_the_mlcl_defaults(name):
    cfg = method_section(name, "mlcl")
    assert cfg["p2p_weight"] == 0.1 and cfg["proto_weight"] == 0.01 and cfg["sai_weight"] == 0.01
    assert cfg["momentum"] == 0.99 and cfg["anchor_thresh"] == (0.8 if name == "demo" else 0.95)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("mlcl.proto_pairing=diagonal", "key 'mlcl.proto_pairing' must be one of"),
        ("mlcl.momentum=1.5", "key 'mlcl.momentum' must lie in [0.0, 1.0]"),
        ("mlcl.num_anchors=0", "key 'mlcl.num_anchors' must lie in [1, inf]"),
        ("mlcl.p2p_weight=-0.1", "key 'mlcl.p2p_weight' must lie in [0.0, inf]"),
        ("mlcl.sai_nosie=true", "unknown config key 'mlcl.sai_nosie' (did you mean 'mlcl.sai_noise'?)"),
    ],
)
def test_bad_mlcl_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert needle in str(err.value)


# -------------------------------------------------------------------------------------------- real runs
@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        TINY.format(root=tmp_path) + "mlcl: {anchor_thresh: 0.2, num_anchors: 4, num_strong: 8}\n"
    )
    return str(path)


def test_mlcl_resumes_with_its_prototype_memory(tiny_config, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    script = [sys.executable, "tests/run_training.py", "MLCL", "--config", tiny_config]
    run([*script, "--save-path", str(straight)])
    run([*script, "--save-path", str(crashed), "--crash-at", "5"], expect=17)
    saved = torch.load(crashed / "latest.pth", weights_only=True)
    assert saved["iteration"] == 4 and saved["method"]["prototypes"]["initialised"].any()
    log = run([*script, "--save-path", str(crashed)])
    assert "at iteration 4/6" in log
    a, b = (torch.load(d / "latest.pth", weights_only=True) for d in (straight, crashed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resumed weights differ"
    for key in ("memory", "initialised"):
        assert torch.equal(a["method"]["prototypes"][key], b["method"]["prototypes"][key])


# The released code's behaviour, as docs/DIFFERENCES.md lists it.
RELEASED = [
    "mlcl.fka_feature=decoder", "mlcl.p2p_weight=0", "mlcl.proto_pairing=positional",
    "mlcl.anchor_selection=released", "mlcl.proto_denominator=strong", "mlcl.ema_update=released",
    "mlcl.sai_feature=decoder", "mlcl.sai_strength=released",
]  # fmt: skip


def test_mlcl_two_process_gloo_run_finishes_and_resumes(tiny_config, tmp_path):
    """The released preset under two gloo processes (its per-rank memory steps averaged across ranks)."""
    save, dump = tmp_path / "ddp", tmp_path / "dump"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["MLCL.py", "--config", tiny_config, "--save-path", str(save)]
    run([*launch, *args, "max_iters=4", *RELEASED])
    assert torch.load(save / "latest.pth", weights_only=True)["iteration"] == 4
    log = run([*launch, "tests/run_training.py", "MLCL", "--config", tiny_config, "--save-path", str(save),
               "--dump-weights", str(dump), *RELEASED])  # fmt: skip
    assert "resumed from" in log and "at iteration 4/6" in log
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    final = torch.load(save / "latest.pth", weights_only=True)
    assert final["iteration"] == 6 and final["method"]["prototypes"]["initialised"].any()
    assert all(torch.equal(r0[k], v) for k, v in weights(save / "latest.pth").items())
