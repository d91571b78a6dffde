"""DUEB: CPCL's intersection/union pseudo-labels, the aleatoric and energy losses against loop references
and hand computations (paper and released variants), their gradient paths; the method's networks, forward
passes and optimizer per switch; one whole step of both branches on per-pixel networks against loops (which
labels teach which branch, the CutMix box of the teachers' predictions, every weight); the global confusion
matrix under two gloo processes; a two-process run killed and resumed bit-identically, and eval.py on its
best.pth."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from DUEB import DUEB
from tests import dueb_ranks
from tests.test_training import run
from tests.test_unimatch_step import make_batch
from unimatch import cutmix
from util.config import ConfigError, load_config
from util.engine import Trainer
from util.losses import cross_entropy
from util.losses.dueb import (
    aleatoric_loss,
    conflict_rates,
    confusion_counts,
    elu,
    energy_loss,
    global_cross_labels,
    heteroscedastic_cross_entropy,
    intersection_union_labels,
    noisy_target_nll,
    weighted_cross_entropy,
)

IGNORE = 255


def log_softmax(values):
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def pixels(t):
    """(b, i, j) of every pixel of a (B, H, W) or (B, K, H, W) tensor."""
    B, H, W = t.shape[0], t.shape[-2], t.shape[-1]
    return [(b, i, j) for b in range(B) for i in range(H) for j in range(W)]


# ---------------------------------------------------------------- intersection / union pseudo-labels
def cross_labels_reference(pred_1, conf_1, pred_2, conf_2, valid, K):
    """CPCL's recipe one pixel at a time: the confusion matrix of the valid pixels plus one agreeing pixel
    per class, the normalised conflict rates, then the two targets."""
    counts = [[0] * K for _ in range(K)]
    for p in pixels(pred_1):
        if valid[p]:
            counts[int(pred_1[p])][int(pred_2[p])] += 1
    for c in range(K):
        counts[c][c] += 1
    rate = []
    for c in range(K):
        col = sum(counts[r][c] for r in range(K))
        row = sum(counts[c])
        rate.append((col - counts[c][c]) / col + (row - counts[c][c]) / row)
    total = sum(rate)
    rate = [r / (total + 1e-6) for r in rate]
    inter, inter_w = torch.full_like(pred_1, IGNORE), torch.zeros_like(conf_1)
    union, union_w = torch.full_like(pred_1, IGNORE), torch.zeros_like(conf_1)
    for p in pixels(pred_1):
        a, b = int(pred_1[p]), int(pred_2[p])
        w1, w2 = float(conf_1[p]), float(conf_2[p])
        inter_w[p] = (w1 + w2) / 2
        if a == b:
            union_w[p] = (w1 + w2) / 2
        elif rate[a] > rate[b]:
            union_w[p] = w1
        else:  # a tie goes to branch 2
            union_w[p] = w2
        if not valid[p]:
            continue
        if a == b:
            inter[p] = union[p] = a
        else:
            union[p] = a if rate[a] > rate[b] else b
    return counts, rate, inter, inter_w, union, union_w


def teacher_outputs(seed=0, B=2, K=5, H=4, W=5):
    """Two teachers' hard predictions and confidences; branch 1 never predicts the last class."""
    g = torch.Generator().manual_seed(seed)
    pred_1 = torch.randint(0, K - 1, (B, H, W), generator=g)
    pred_2 = torch.where(
        torch.rand(B, H, W, generator=g) < 0.5, pred_1, torch.randint(0, K, (B, H, W), generator=g)
    )
    conf_1, conf_2 = torch.rand(B, H, W, generator=g), torch.rand(B, H, W, generator=g)
    valid = torch.rand(B, H, W, generator=g) > 0.15
    return pred_1, conf_1, pred_2, conf_2, valid


def check_cross_labels(pred_1, conf_1, pred_2, conf_2, valid, K):
    counts, rate, inter, inter_w, union, union_w = cross_labels_reference(
        pred_1, conf_1, pred_2, conf_2, valid, K
    )
    got_counts = confusion_counts(pred_1, pred_2, valid, K)
    got_rate = conflict_rates(got_counts)
    # the reference adds the one agreeing pixel per class to its matrix; the counts are the raw ones
    assert torch.equal(got_counts + torch.eye(K, dtype=got_counts.dtype), torch.tensor(counts))
    assert torch.allclose(got_rate, torch.tensor(rate, dtype=torch.double), rtol=1e-12, atol=0)
    labels = intersection_union_labels(pred_1, conf_1, pred_2, conf_2, got_rate, valid)
    assert torch.equal(labels.inter_label, inter) and torch.equal(labels.union_label, union)
    # weights matter where the label is not ignored
    assert torch.allclose(labels.inter_weight[inter != IGNORE], inter_w[inter != IGNORE])
    assert torch.allclose(labels.union_weight[union != IGNORE], union_w[union != IGNORE])
    return labels, rate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intersection_union_match_loop_reference_with_a_class_absent_from_one_branch(seed):
    K = 5
    pred_1, conf_1, pred_2, conf_2, valid = teacher_outputs(seed, K=K)
    assert not (pred_1 == K - 1).any() and (pred_2 == K - 1).any()
    labels, rate = check_cross_labels(pred_1, conf_1, pred_2, conf_2, valid, K)
    # the intersection keeps exactly the agreeing valid pixels; the union labels every valid pixel
    assert torch.equal(labels.inter_label != IGNORE, (pred_1 == pred_2) & valid)
    assert torch.equal(labels.union_label != IGNORE, valid)


def test_union_ties_go_to_branch_2():
    # classes 0 and 1 are swapped symmetrically (one pixel each way), so their conflict rates are equal;
    # class 2 never conflicts and class 3 is predicted by nobody
    pred_1 = torch.tensor([[[0, 1, 2, 2, 0, 1]]])
    pred_2 = torch.tensor([[[1, 0, 2, 2, 0, 1]]])
    conf_1 = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]])
    conf_2 = torch.tensor([[[0.3, 0.2, 0.1, 0.2, 0.3, 0.4]]])
    valid = torch.ones_like(pred_1, dtype=torch.bool)
    labels, rate = check_cross_labels(pred_1, conf_1, pred_2, conf_2, valid, 4)
    assert rate[0] == rate[1] > 0 and rate[2] == rate[3] == 0
    assert labels.union_label[0, 0, :2].tolist() == [1, 0]
    assert torch.allclose(labels.union_weight[0, 0, :2], torch.tensor([0.3, 0.2]))
    assert labels.inter_label[0, 0].tolist() == [IGNORE, IGNORE, 2, 2, 0, 1]


@pytest.mark.parametrize("count_ignored", [False, True])
def test_weighted_cross_entropy_matches_loop(count_ignored):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, 4, generator=g)
    label = torch.randint(0, 3, (2, 3, 4), generator=g)
    label[torch.rand(2, 3, 4, generator=g) < 0.4] = IGNORE
    weight = torch.rand(2, 3, 4, generator=g)
    total, n = 0.0, 0
    for p in pixels(label):
        if label[p] != IGNORE:
            z = [float(v) for v in logits[p[0], :, p[1], p[2]]]
            total += -log_softmax(z)[int(label[p])] * float(weight[p])
            n += 1
    expected = total / (label.numel() if count_ignored else n)
    got = weighted_cross_entropy(logits, label, weight, count_ignored)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    empty = torch.full_like(label, IGNORE)
    assert weighted_cross_entropy(logits, empty, weight, count_ignored).item() == 0.0


# ---------------------------------------------------------------- aleatoric loss
def aleatoric_reference(logits, variance, label, noise, released):
    """The loss one pixel and one Monte-Carlo sample at a time, in Python floats."""
    T = noise.shape[1]
    elu = lambda x: x if x > 0 else math.exp(x) - 1  # noqa: E731
    ce0, ce_t, depressor = {}, {}, {}
    for p in pixels(label):
        b, i, j = p
        z = [float(v) for v in logits[b, :, i, j]]
        sigma = math.sqrt(float(variance[b, 0, i, j]) + 1e-15)
        depressor[p] = math.exp(float(variance[b, 0, i, j])) - 1
        if label[p] == IGNORE:
            continue
        y = int(label[p])
        ce0[p] = -log_softmax(z)[y]
        ce_t[p] = []
        for t in range(T):
            noisy = [v + sigma * float(noise[b, t, c, i, j]) for c, v in enumerate(z)]
            ce_t[p].append(-log_softmax(noisy)[y])
    if released:
        n = len(ce0)
        mean0 = sum(ce0.values()) / n
        means = [sum(ce_t[p][t] for p in ce0) / n for t in range(T)]
        mc = sum(-elu(mean0 - m) for m in means) / T
        return mean0 + mean0 * mc + sum(depressor.values()) / len(depressor)
    total = 0.0
    for p in ce0:
        mc = sum(-elu(ce0[p] - c) for c in ce_t[p]) / T
        total += ce0[p] + ce0[p] * mc + depressor[p]
    return total / len(ce0)


def aleatoric_inputs(seed=0, T=10, B=2, K=3, H=3, W=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, H, W, generator=g) * 2
    variance = F.softplus(torch.randn(B, 1, H, W, generator=g))
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[torch.rand(B, H, W, generator=g) < 0.3] = IGNORE
    noise = torch.randn(B, T, K, H, W, generator=g)
    return logits, variance, label, noise


def test_aleatoric_by_hand_on_two_pixels():
    # one image, two classes, two pixels (the second ignored), two samples with fixed noise
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    variance = torch.tensor([[[[0.25, 1.0]]]])  # sigma 0.5 at the labelled pixel
    label = torch.tensor([[[0, IGNORE]]])
    noise = torch.zeros(1, 2, 2, 1, 2)  # (B, T, K, H, W)
    noise[0, 0, :, 0, 0] = torch.tensor([2.0, 0.0])  # sample 1: z = (3, 0), fits better
    noise[0, 1, :, 0, 0] = torch.tensor([-2.0, 2.0])  # sample 2: z = (1, 1), fits worse
    ce0 = math.log(1 + math.exp(-2))
    ce1, ce2 = math.log(1 + math.exp(-3)), math.log(2)
    mc = (-(ce0 - ce1) - (math.exp(ce0 - ce2) - 1)) / 2
    paper = ce0 + ce0 * mc + (math.exp(0.25) - 1)
    # released: batch means are the one labelled pixel's values; the depressor averages both pixels
    released = ce0 + ce0 * mc + (math.exp(0.25) - 1 + math.exp(1.0) - 1) / 2
    assert aleatoric_loss(logits, variance, label, noise).item() == pytest.approx(paper, rel=1e-6)
    assert aleatoric_loss(logits, variance, label, noise, released=True).item() == pytest.approx(
        released, rel=1e-6
    )


@pytest.mark.parametrize("released", [False, True])
def test_aleatoric_matches_loop_reference(released):
    for seed in range(2):
        logits, variance, label, noise = aleatoric_inputs(seed)
        expected = aleatoric_reference(logits, variance, label, noise, released)
        got = aleatoric_loss(logits, variance, label, noise, released)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_aleatoric_gradient_reaches_the_variance_through_the_samples_only_in_paper_mode():
    logits, variance, label, noise = aleatoric_inputs(3)
    grads = {}
    for released in (False, True):
        v = variance.clone().requires_grad_()
        aleatoric_loss(logits, v, label, noise, released).backward()
        grads[released] = v.grad
    # released: only the depressor mean(exp(v) - 1) over all pixels reaches v
    assert torch.allclose(grads[True], variance.exp() / variance.numel())
    # paper: the masked depressor plus the reparameterised Monte-Carlo term
    depressor = variance.exp() * (label != IGNORE).unsqueeze(1) / (label != IGNORE).sum()
    assert (grads[False] - depressor).abs().max() > 1e-4
    assert (grads[False][(label == IGNORE).unsqueeze(1)] == 0).all()


def test_hand_written_gradients_equal_autograd_of_the_plain_formulas():
    logits, variance, label, noise = (t.double() if t.is_floating_point() else t for t in aleatoric_inputs(4))
    label = label.clamp(max=logits.shape[1] - 1)
    logits = logits.to(memory_format=torch.channels_last).requires_grad_()  # as the model gives them
    sigma = variance.sqrt().unsqueeze(1).requires_grad_()
    upstream = torch.rand(noise.shape[0], noise.shape[1], *label.shape[1:], dtype=torch.double)
    got = noisy_target_nll(logits, sigma, noise, label)
    grads = torch.autograd.grad((got * upstream).sum(), (logits, sigma))
    samples = logits.unsqueeze(1) + sigma * noise
    plain = (
        -samples.log_softmax(dim=2).gather(2, label[:, None, None].expand_as(samples[:, :, :1])).squeeze(2)
    )
    expected = torch.autograd.grad((plain * upstream).sum(), (logits, sigma))
    assert torch.allclose(got, plain)
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected))
    # the samples' memory is reused by the backward pass: a second one fails instead of returning garbage
    got = noisy_target_nll(logits, sigma, noise, label).sum()
    got.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        got.backward()

    x = torch.tensor([-100.0, -3.0, -1e-4, 0.0, 1e-4, 2.0], dtype=torch.double, requires_grad=True)
    assert torch.allclose(elu(x), F.elu(x))
    (grad,) = torch.autograd.grad(elu(x).sum(), x)
    (expected,) = torch.autograd.grad(F.elu(x).sum(), x)
    assert torch.allclose(grad, expected)


@pytest.mark.parametrize("with_sigma", [True, False])
def test_heteroscedastic_cross_entropy_and_its_forward_pass_gradients_equal_autograd_of_the_plain_formula(
    with_sigma,
):
    logits, variance, label, noise = (t.double() if t.is_floating_point() else t for t in aleatoric_inputs(5))
    label = label.clamp(max=logits.shape[1] - 1)
    logits = logits.to(memory_format=torch.channels_last).requires_grad_()  # as the model gives them
    sigma = variance.sqrt().unsqueeze(1).requires_grad_(with_sigma)
    upstream = torch.randn(label.shape, dtype=torch.double)
    inputs = (logits, sigma) if with_sigma else (logits,)

    got = heteroscedastic_cross_entropy(logits, sigma, noise, label)
    grads = torch.autograd.grad((got * upstream).sum(), inputs)
    ce_clean = -logits.log_softmax(dim=1).gather(1, label.unsqueeze(1)).squeeze(1)
    samples = logits.unsqueeze(1) + sigma * noise
    index = label[:, None, None].expand(-1, noise.shape[1], 1, -1, -1)
    ce_noisy = -samples.log_softmax(dim=2).gather(2, index).squeeze(2)  # (B, T, H, W)
    gap = ce_clean.unsqueeze(1) - ce_noisy
    assert (gap > 0).any() and (gap < 0).any()  # both sides of the ELU
    plain = ce_clean + ce_clean * (-F.elu(gap)).mean(dim=1)
    expected = torch.autograd.grad((plain * upstream).sum(), inputs)
    assert got.dtype == torch.double and torch.allclose(got, plain)
    for g, e in zip(grads, expected):
        assert g.shape == e.shape and torch.allclose(g, e)


@pytest.mark.parametrize("released", [False, True])
def test_aleatoric_with_no_labelled_pixel_is_finite(released):
    logits, variance, label, noise = aleatoric_inputs(0)
    logits.requires_grad_()
    loss = aleatoric_loss(logits, variance, torch.full_like(label, IGNORE), noise, released)
    loss.backward()
    expected = (variance.exp() - 1).mean().item() if released else 0.0
    assert loss.item() == pytest.approx(expected) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- energy loss
def energy_reference(logits, label, released):
    values = []
    for p in pixels(label):
        if label[p] == IGNORE:
            continue
        z = [float(v) for v in logits[p[0], :, p[1], p[2]]]
        if released:
            prob = math.exp(log_softmax(z)[int(label[p])])
            if float(torch.tensor(prob, dtype=torch.float32)) != 0.0:  # the float32 softmax is 0
                values.append(prob)
        else:
            top = max(z)
            values.append(-(top + math.log(sum(math.exp(v - top) for v in z))))
    if not values:
        return 0.0
    if released:
        return math.log(sum(math.exp(v) for v in values))
    return sum(values) / len(values)


@pytest.mark.parametrize("released", [False, True])
def test_energy_matches_loop_reference(released):
    logits, _, label, _ = aleatoric_inputs(1)
    # a pixel whose target probability underflows to exactly 0 in float32: the released code drops it
    logits[0, :, 0, 0] = torch.tensor([0.0, -200.0, 0.0])
    label[0, 0, 0] = 1
    assert torch.softmax(logits[0, :, 0, 0], 0)[1] == 0
    expected = energy_reference(logits, label, released)
    assert energy_loss(logits, label, released).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("released", [False, True])
def test_energy_of_an_empty_selection_is_zero_with_finite_gradient(released):
    logits, _, label, _ = aleatoric_inputs(2)
    logits.requires_grad_()
    loss = energy_loss(logits, torch.full_like(label, IGNORE), released)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------- the method
def test_pseudo_labels_use_the_conflict_rates_of_the_global_batch(tmp_path):
    torch.multiprocessing.spawn(dueb_ranks.worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    data = [dueb_ranks.rank_data(rank) for rank in (0, 1)]
    # one process holding both ranks' batches
    together = global_cross_labels(*(torch.cat(parts) for parts in zip(*data)), dueb_ranks.NCLASS)
    differs_from_local = False
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        part = slice(2 * rank, 2 * rank + 2)
        for key, value in got.items():
            assert torch.equal(value, getattr(together, key)[part]), f"rank {rank}: {key}"
        local = global_cross_labels(*data[rank], dueb_ranks.NCLASS)  # no process group: this rank's rates
        differs_from_local |= not torch.equal(local.union_label, got["union_label"])
    assert differs_from_local, "the test data cannot tell global from per-rank conflict rates"


def dueb_trainer(config, *overrides):
    return Trainer(DUEB, load_config(config, list(overrides)), save_path=None)


def parameters(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.named_parameters())


@pytest.mark.parametrize("mode", ["paper", "released", "off"])
def test_networks_optimizer_and_what_one_step_trains(tiny_config, mode):
    trainer = dueb_trainer(tiny_config, f"dueb.aleatoric={mode}", "lr_multi=10")
    nets = trainer.networks
    assert nets.evaluate == ("branch1",) and nets.deploy == ("branch1",)
    assert not torch.equal(nets.all["branch1"].classifier.weight, nets.all["branch2"].classifier.weight)
    heads = {f"variance{k}" for k in (1, 2)}
    optimised = {
        id(p): group["lr_scale"] for group in trainer.optimizer.param_groups for p in group["params"]
    }
    if mode == "paper":  # trained at the head's learning rate
        assert set(nets.trained) == {"branch1", "branch2", *heads} and not nets.frozen
        assert all(optimised.get(id(p)) == 10.0 for h in heads for p in nets.all[h].parameters())
    elif mode == "released":  # in no optimizer, no gradient: left at their initialisation
        assert set(nets.trained) == {"branch1", "branch2"} and set(nets.frozen) == heads
        assert all(
            id(p) not in optimised and not p.requires_grad for h in heads for p in nets.all[h].parameters()
        )
    else:
        assert set(nets.all) == {"branch1", "branch2"}
    before = {name: parameters(net) for name, net in nets.all.items()}
    loss, terms, _ = trainer.train_step(next(iter(trainer.batches(0))))
    expected = {"x", "u", "energy"} | ({"aleatoric"} if mode != "off" else set())
    assert set(terms) == expected and math.isfinite(loss)
    assert changed(before["branch1"], nets.all["branch1"]) and changed(before["branch2"], nets.all["branch2"])
    for head in heads & set(nets.all):
        assert changed(before[head], nets.all[head]) == (mode == "paper")


def test_variance_heads_are_the_same_on_every_rank(tiny_config):
    """The engine seeds each rank differently before networks(); the frozen (released) heads are not
    broadcast, so they are drawn from a seed of their own."""
    cfg = load_config(tiny_config, ["dueb.aleatoric=released"])
    built = []
    for rank_seed in (0, 1):
        torch.manual_seed(rank_seed)
        built.append(DUEB(cfg, cross_entropy, torch.device("cpu")).networks())
    for k in (1, 2):
        a, b = (n.frozen[f"variance{k}"].conv.weight for n in built)
        assert torch.equal(a, b)
    assert not torch.equal(built[0].frozen["variance1"].conv.weight, built[0].frozen["variance2"].conv.weight)


@pytest.mark.parametrize("view, aleatoric", [("weak", "paper"), ("strong", "off")])
def test_each_branch_runs_one_teacher_and_one_student_forward(tiny_config, view, aleatoric):
    trainer = dueb_trainer(tiny_config, f"dueb.student_view={view}", f"dueb.aleatoric={aleatoric}")
    calls = []
    for k in (1, 2):
        trainer.networks.all[f"branch{k}"].register_forward_hook(
            lambda module, args, kwargs, out, k=k: calls.append(
                (k, args[0], torch.is_grad_enabled(), kwargs.get("features", False))
            ),
            with_kwargs=True,
        )
    batch = next(iter(trainer.batches(0)))
    trainer.method.step(batch)
    img_x = batch["labeled"][0]
    img_u, img_u_s, _, _, box, _ = batch["unlabeled"]
    img_m, img_m_s = batch["mix"][0], batch["mix"][1]
    student = cutmix(img_u, img_m, box) if view == "weak" else cutmix(img_u_s, img_m_s, box)
    assert [(k, grad, feature) for k, _, grad, feature in calls] == [
        (1, False, False),  # teachers: both unlabeled images, no gradient, logits only
        (2, False, False),
        (1, True, aleatoric != "off"),  # students: labeled + CutMixed images; the feature for the variance
        (2, True, aleatoric != "off"),
    ]
    for _, image, grad, _ in calls:
        assert torch.equal(image, torch.cat((img_x, student)) if grad else torch.cat((img_u, img_m)))


def pointwise_dueb(**dueb):
    """DUEB over two per-pixel branches (tests/pointwise.py) with weights of their own; with the aleatoric
    term on, variance heads that predict v = softplus(-30) ~ 1e-13: the Monte-Carlo samples then equal the
    logits to ~1e-6, and the term is the plain cross-entropy whatever the noise draws are."""
    from DUEB import VarianceHead
    from tests.pointwise import PointwiseNet
    from util.config import defaults

    K, C = 3, 4
    cfg = {**defaults(), "nclass": K, "head_channels": C}
    cfg["dueb"] = {**cfg["dueb"], **dueb}
    method = DUEB(cfg, cross_entropy, torch.device("cpu"))
    nets = {"branch1": PointwiseNet(K, C, seed=41), "branch2": PointwiseNet(K, C, seed=40)}
    if method.aleatoric != "off":
        for k in (1, 2):
            head = VarianceHead(C)
            with torch.no_grad():
                head.conv.weight.zero_()
                head.conv.bias.fill_(-30.0)
            nets[f"variance{k}"] = head
    method.attach(nets, nets)
    return method, nets


@pytest.mark.parametrize("view", ["weak", "strong"])
def test_step_terms_of_both_branches_equal_the_loop_reference(view):
    """One DUEB step on per-pixel branches, recomputed with loops: each branch, as its own teacher,
    predicts both unlabeled images, pasted by the box that mixes the image the branches learn from (read
    from that image); CPCL's intersection labels teach branch 1 and the union labels branch 2, each with
    its weights; each branch's energy and aleatoric terms weigh its labeled and unlabeled parts
    differently; every term is the sum of the two branches'. All weights differ from one another."""
    from tests.pointwise import ce, maps, mean_ce, mix_padded_elsewhere, softmax, vec

    method, nets = pointwise_dueb(lambda_u=2.0, weight_labeled=0.3, weight_unlabeled=0.7, student_view=view)
    seen = []
    for k in (1, 2):
        nets[f"branch{k}"].register_forward_hook(
            lambda _, args, out, k=k: seen.append((k, args[0], torch.is_grad_enabled()))
        )
    batch = mix_padded_elsewhere(make_batch(B=2, H=4, W=5, K=3, seed=43))
    losses, _ = method.step(batch)

    img_x, mask_x = batch["labeled"]
    img_u, img_u_s, _, ignore = batch["unlabeled"][:4]
    img_m, img_m_s, _, ignore_m = batch["mix"][:4]
    students = [image for _, image, grad in seen if grad]
    assert len(students) == 2 and torch.equal(students[0], students[1])
    B = img_x.shape[0]
    assert torch.equal(students[0][:B], img_x)
    mixed = students[0][B:]
    base, pasted = (img_u, img_m) if view == "weak" else (img_u_s, img_m_s)
    box = torch.zeros_like(ignore, dtype=torch.bool)
    for p in pixels(ignore):
        b, y, x = p
        box[p] = torch.equal(mixed[b, :, y, x], pasted[b, :, y, x])
        assert box[p] or torch.equal(mixed[b, :, y, x], base[b, :, y, x]), "not a CutMix of the two images"
    assert box.any() and not box.all()

    predictions = []
    for k in (1, 2):
        logits_u, logits_m = maps(nets[f"branch{k}"], img_u)[1], maps(nets[f"branch{k}"], img_m)[1]
        label, confidence = torch.zeros_like(ignore), torch.zeros(ignore.shape)
        for p in pixels(ignore):
            prob = softmax(vec(logits_m if box[p] else logits_u, *p))
            label[p] = max(range(len(prob)), key=lambda c: prob[c])
            confidence[p] = prob[int(label[p])]
        predictions += [label, confidence]
    valid = torch.where(box, ignore_m, ignore) != IGNORE
    _, _, inter, inter_w, union, union_w = cross_labels_reference(*predictions, valid, 3)
    assert not torch.equal(inter, union), "the branches agree everywhere: the labels cannot be told apart"

    expected = {"x": 0.0, "u": 0.0, "energy": 0.0, "aleatoric": 0.0}
    for k, label, weight in ((1, inter, inter_w), (2, union, union_w)):
        logits_x, logits_u = maps(nets[f"branch{k}"], img_x)[1], maps(nets[f"branch{k}"], mixed)[1]
        labelled = [p for p in pixels(label) if label[p] != IGNORE]
        expected["x"] += mean_ce(logits_x, mask_x)
        expected["u"] += (
            2.0
            * sum(float(weight[p]) * ce(vec(logits_u, *p), int(label[p])) for p in labelled)
            / len(labelled)
        )
        expected["energy"] += 0.3 * energy_reference(logits_x, mask_x, True) + 0.7 * energy_reference(
            logits_u, label, True
        )
        expected["aleatoric"] += 0.3 * mean_ce(logits_x, mask_x) + 0.7 * mean_ce(logits_u, label)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize(
    "override, needle",
    [
        ("dueb.aleatoric=fixed", "key 'dueb.aleatoric' must be one of"),
        ("dueb.energy=on", "key 'dueb.energy' must be one of"),
        ("dueb.mc_samples=0", "key 'dueb.mc_samples' must lie in [1, inf]"),
        ("dueb.lambda_u=-1", "key 'dueb.lambda_u' must lie in [0.0, inf]"),
        ("dueb.energie=off", "unknown config key 'dueb.energie' (did you mean 'dueb.energy'?)"),
    ],
)
def test_bad_dueb_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert needle in str(err.value)


def test_two_process_run_ranks_agree_resumes_bit_identically_and_eval_scores_branch_1(tiny_config, tmp_path):
    straight, killed, dump = tmp_path / "straight", tmp_path / "killed", tmp_path / "dump"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = [*launch, "tests/run_training.py", "DUEB", "--config", tiny_config]
    run([*script, "--save-path", str(straight), "--dump-weights", str(dump)])
    # rank 1 is SIGKILLed before iteration 5 (the last checkpoint is iteration 4); the same command resumes
    run([*script, "--save-path", str(killed), "--kill-at", "5", "--kill-rank", "1"], expect=1)
    log = run([*script, "--save-path", str(killed)])
    assert "at iteration 4/6" in log

    a, b = (torch.load(d / "latest.pth", weights_only=True) for d in (straight, killed))
    assert sorted(a["networks"]) == ["branch1", "branch2", "variance1", "variance2"]
    for name, weights in a["networks"].items():
        assert all(torch.equal(v, b["networks"][name][k]) for k, v in weights.items()), f"{name} differs"
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"

    rows = [json.loads(line) for line in (straight / "evals.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["network"]) for r in rows] == [(3, "branch1"), (6, "branch1")]
    best = torch.load(straight / "best.pth", weights_only=True)
    assert best["network"] == "branch1"
    out = run(
        [sys.executable, "eval.py", "--config", tiny_config, "--checkpoint", str(straight / "best.pth")]
    )
    assert f"{best['miou']:.2f}" in out
