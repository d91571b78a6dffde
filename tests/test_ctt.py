"""CTT: every term against a loop over images, classes, anchors and entries of the formula it implements,
the FIFO queue against a list, and the queue's cross-rank gather under two gloo processes; one whole step
of both students on per-pixel networks against loops (who teaches whom, ClassMix, every term), the teachers
following their own students, and the banks a train-mode teacher feeds."""

import math
import sys

import numpy as np
import pytest
import torch

from tests import ctt_ranks
from tests.test_engine_networks import same
from tests.test_unimatch_step import make_batch
from util.losses import ctt as L


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


# ----------------------------------------------------------------------------------------- ClassMix
def classmix_mask_reference(label, valid, uniform):
    B, H, W = label.shape
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    for i in range(B):
        present = sorted({int(label[i, y, x]) for y in range(H) for x in range(W) if valid[i, y, x]})
        by_draw = sorted(present, key=lambda c: float(uniform[i, c]))
        chosen = set(by_draw[: len(present) // 2])
        for y in range(H):
            for x in range(W):
                mask[i, y, x] = bool(valid[i, y, x]) and int(label[i, y, x]) in chosen
    return mask


def test_classmix_mask_takes_half_the_classes_of_each_image():
    g = torch.Generator().manual_seed(0)
    B, K, H, W = 4, 6, 5, 7
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[1] = torch.randint(0, 3, (H, W), generator=g)  # 3 classes: 1 is chosen
    label[2] = 4  # one class: none is chosen, the image is all background
    valid = torch.rand(B, H, W, generator=g) > 0.2
    label[3][~valid[3]] = 5  # class 5 only on padding in image 3: it does not count
    for seed in range(5):
        uniform = torch.rand(B, K, generator=torch.Generator().manual_seed(seed))
        got = L.classmix_mask(label, valid, uniform)
        assert torch.equal(got, classmix_mask_reference(label, valid, uniform))
    assert not got[2].any() and not (got & ~valid).any()


def test_classmix_pastes_image_i_onto_image_i_plus_one_and_mixes_the_teacher_the_same_way():
    """The mixed pseudo-label and confidence (max of the mixed teacher softmax) equal mixing the teacher's
    pseudo-label and confidence maps, as the step does."""
    g = torch.Generator().manual_seed(1)
    B, K, H, W = 3, 4, 4, 5
    image = torch.randn(B, 3, H, W, generator=g)
    prob = torch.randn(B, K, H, W, generator=g).softmax(dim=1)
    paste = torch.rand(B, H, W, generator=g) > 0.5
    mixed_image = L.classmix(image, paste)
    confidence, label = prob.max(dim=1)
    mixed_conf, mixed_label = L.classmix(confidence, paste), L.classmix(label, paste)
    for i in range(B):
        j = (i + 1) % B
        for y in range(H):
            for x in range(W):
                src = i if paste[i, y, x] else j
                assert torch.equal(mixed_image[i, :, y, x], image[src, :, y, x])
                m = float(paste[i, y, x])
                p = [m * float(prob[i, k, y, x]) + (1 - m) * float(prob[j, k, y, x]) for k in range(K)]
                assert int(mixed_label[i, y, x]) == max(range(K), key=lambda k: p[k])
                assert float(mixed_conf[i, y, x]) == pytest.approx(max(p), abs=1e-7)


# ----------------------------------------------------------------------------------------------- CT
def test_ct_loss_weight_is_the_global_fraction_of_confident_pixels():
    g = torch.Generator().manual_seed(2)
    B, K, H, W = 2, 3, 3, 4
    ranks = []
    for _ in range(2):  # two "ranks": the weight is global, the cross-entropy mean local
        logits = torch.randn(B, K, H, W, generator=g)
        label = torch.randint(0, K, (B, H, W), generator=g)
        conf = torch.rand(B, H, W, generator=g)
        valid = torch.rand(B, H, W, generator=g) > 0.25
        ranks.append((logits, label, conf, valid))
    counts = sum(L.confident_counts(c, v, 0.6) for _, _, c, v in ranks)
    confident = sum(int(((c >= 0.6) & v).sum()) for _, _, c, v in ranks)
    total = sum(int(v.sum()) for _, _, _, v in ranks)
    assert counts.tolist() == [confident, total]
    for logits, label, _, valid in ranks:
        ce = [
            -math.log(softmax(logits[b, :, y, x].tolist())[int(label[b, y, x])])
            for b in range(B) for y in range(H) for x in range(W) if valid[b, y, x]
        ]  # fmt: skip
        expected = confident / total * sum(ce) / len(ce)
        assert L.ct_loss(logits, label, valid, counts).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------- selections
def test_per_class_sample_and_bank_candidates_match_loop():
    g = torch.Generator().manual_seed(3)
    N, K = 30, 4
    logits = torch.randn(N, K, generator=g) * 3
    label = torch.randint(0, K, (N,), generator=g)
    label[::5] = 255
    for use_logit, thresh in ((False, 0.6), (True, 1.0)):
        candidate, score = L.bank_candidates(logits, label, thresh, use_logit)
        for n in range(N):
            values = logits[n].tolist() if use_logit else softmax(logits[n].tolist())
            right = int(label[n]) == max(range(K), key=lambda k: values[k])
            assert bool(candidate[n]) == (right and max(values) >= thresh)
            assert float(score[n]) == pytest.approx(max(values), abs=1e-6)
        index, chosen = L.per_class_sample(L.of_class(label, K) & candidate, score, 2)
        for c in range(K):
            expected = sorted(
                (n for n in range(N) if candidate[n] and label[n] == c), key=lambda n: -score[n]
            )
            assert index[c][chosen[c]].tolist() == expected[:2]
    assert candidate.any() and not candidate[::5].any()


def test_unreliable_pixels_follow_the_entropy_quantile_and_its_schedule():
    g = torch.Generator().manual_seed(4)
    N, K = 40, 5
    prob = (torch.randn(N, K, generator=g) * 2).softmax(dim=1)
    valid = torch.rand(N, generator=g) > 0.2
    entropy = [-sum(p * math.log(p) for p in prob[n].tolist()) for n in range(N)]
    assert L.unreliable_fraction(0.2, 0, 100) == pytest.approx(0.2)
    assert L.unreliable_fraction(0.2, 75, 100) == pytest.approx(0.05)
    assert L.unreliable_fraction(0.2, 100, 100) == 0
    for fraction in (0.2, 0.5):
        thresh = np.percentile([entropy[n] for n in range(N) if valid[n]], 100 * (1 - fraction))
        expected = [bool(valid[n]) and entropy[n] >= thresh - 1e-6 for n in range(N)]
        got = L.unreliable_mask(prob, valid, fraction)
        assert got.tolist() == expected
        assert abs(int(got.sum()) - fraction * int(valid.sum())) <= 1
    assert not L.unreliable_mask(prob, valid, 0.0).any()
    unreliable = L.unreliable_mask(prob, valid, 0.5)
    negatives = L.negative_candidates(prob, unreliable, 2)
    for n in range(N):
        top2 = sorted(range(K), key=lambda k: -prob[n, k])[:2]
        assert negatives[:, n].tolist() == [bool(unreliable[n]) and k not in top2 for k in range(K)]


# -------------------------------------------------------------------------------- contrastive terms
def contrast_case(seed=5, K=3, n=4, N=5, D=6):
    """Anchors of K classes (class 2 has none, class 1 a single one) and a bank whose class 1 is empty
    and class 2 half full."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(K, n, D, generator=g)
    anchor_mask = torch.tensor([[True] * n, [True] + [False] * (n - 1), [False] * n])
    bank = torch.nn.functional.normalize(torch.randn(K, N, D, generator=g), dim=-1)
    filled = torch.ones(K, N, dtype=torch.bool)
    filled[1] = False
    filled[2, N // 2 :] = False
    return anchors, anchor_mask, bank, filled


def flat(anchors, anchor_mask):
    """Anchors (K, n, D) of class k in row k as the losses take them: (K n, D), labels, mask."""
    K, n = anchor_mask.shape
    return anchors.flatten(0, 1), torch.arange(K).repeat_interleave(n), anchor_mask.flatten()


def test_round_robin_shares_the_anchor_budget_among_the_classes_present():
    index = torch.arange(12).view(3, 4)
    chosen = torch.tensor([[True, True, True, True], [False] * 4, [True, False, False, False]])
    got_index, label, mask = L.round_robin(index, chosen, 4)
    # class 0's first, class 2's first, then class 0's second and third: class 2 had only one
    assert got_index.tolist() == [0, 8, 1, 2] and label.tolist() == [0, 2, 0, 0] and mask.all()
    got_index, label, mask = L.round_robin(index, chosen, 8)
    assert got_index[mask].tolist() == [0, 8, 1, 2, 3] and label[mask].tolist() == [0, 2, 0, 0, 0]
    assert not mask[5:].any()


def test_masked_logsumexp_equals_logsumexp_over_the_counted_entries():
    g = torch.Generator().manual_seed(3)
    tau = L.MIN_TEMPERATURE
    cosine = torch.rand(5, 7, generator=g) * 2 - 1
    cosine[0, 0], cosine[0, 1] = 1.0, -1.0  # the extremes: exp sees 0 and -2 / tau = -80
    values = (cosine / tau).requires_grad_()
    weight = (torch.rand(5, 7, generator=g) < 0.6).float()
    weight[0, :2] = 1
    weight[3] = 0  # a row with no counted entry
    got = L.masked_logsumexp(values, weight, 1 / tau)
    (grad,) = torch.autograd.grad(got.sum(), values)
    expected = values.detach().masked_fill(weight == 0, float("-inf")).logsumexp(dim=-1, keepdim=True)
    rows = [0, 1, 2, 4]
    assert torch.allclose(got[rows], expected[rows])
    assert got[3].item() == L.MASKED
    softmax = torch.softmax(values.detach().masked_fill(weight == 0, float("-inf"))[rows], dim=-1)
    # the empty row reaches the sum, and its gradient is zero, not NaN
    assert torch.allclose(grad[rows], softmax) and torch.equal(grad[3], torch.zeros(7))


def nce_reference(anchor, positives, negatives, tau):
    """mean over positives of -log(e^s(a,p) / (e^s(a,p) + sum_n e^s(a,n))), similarities cosine / tau."""
    terms = []
    for p in positives:
        sp = math.exp(cos(anchor, p) / tau)
        sn = sum(math.exp(cos(anchor, q) / tau) for q in negatives)
        terms.append(-math.log(sp / (sp + sn)))
    return sum(terms) / len(terms)


def class_mean(per_class):
    per_class = [sum(v) / len(v) for v in per_class if v]
    return sum(per_class) / len(per_class)


def entries(bank, filled, keep):
    K, N = filled.shape
    return [bank[c, j].tolist() for c in range(K) for j in range(N) if filled[c, j] and keep(c)]


def test_hc_loss_matches_loop():
    anchors, anchor_mask, bank, filled = contrast_case()
    K, n = anchor_mask.shape
    per_class = []
    for c in range(K):
        positives = entries(bank, filled, lambda k, c=c: k == c)
        negatives = entries(bank, filled, lambda k, c=c: k != c)
        per_class.append(
            [nce_reference(anchors[c, i].tolist(), positives, negatives, 0.1)
             for i in range(n) if anchor_mask[c, i] and positives]
        )  # fmt: skip
    expected = class_mean(per_class)  # class 0 only: class 1's bank is empty, class 2 has no anchor
    got = L.hc_loss(*flat(anchors, anchor_mask), bank, filled, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # nothing to contrast: zero, and a finite (zero) gradient
    anchors.requires_grad_()
    empty = L.hc_loss(*flat(anchors, anchor_mask), bank, torch.zeros_like(filled), 0.1)
    empty.backward()
    assert empty.item() == 0 and torch.equal(anchors.grad, torch.zeros_like(anchors))


def test_lc_loss_matches_loop():
    anchors, anchor_mask, bank_a, filled_a = contrast_case(seed=6)
    _, _, bank_b, filled_b = contrast_case(seed=7)
    filled_b[1, :2] = True  # class 1 has entries in bank B only
    peer = torch.randn(anchors.shape, generator=torch.Generator().manual_seed(8))
    K, n = anchor_mask.shape
    per_class = []
    for c in range(K):
        negatives = entries(bank_a, filled_a, lambda k, c=c: k != c)
        negatives += entries(bank_b, filled_b, lambda k, c=c: k != c)
        per_class.append(
            [nce_reference(anchors[c, i].tolist(), [peer[c, i].tolist()], negatives, 0.5)
             for i in range(n) if anchor_mask[c, i]]
        )  # fmt: skip
    banks, filled = torch.cat([bank_a, bank_b], dim=1), torch.cat([filled_a, filled_b], dim=1)
    got = L.lc_loss(*flat(anchors, anchor_mask), peer.flatten(0, 1), banks, filled)
    assert got.item() == pytest.approx(class_mean(per_class), rel=1e-5)
    # the peer is a target: no gradient reaches it
    peer.requires_grad_()
    anchors.requires_grad_()
    L.lc_loss(*flat(anchors, anchor_mask), peer.flatten(0, 1), banks, filled).backward()
    assert peer.grad is None and anchors.grad.abs().sum() > 0


def test_negative_queue_loss_matches_loop():
    anchors, anchor_mask, bank, filled = contrast_case(seed=9)
    anchor_mask[2, :2] = True  # class 2: anchors, half a bank, and an empty queue
    _, _, queue, queue_filled = contrast_case(seed=10, N=3)
    queue_filled[2] = False
    K, n = anchor_mask.shape
    per_class = []
    for c in range(K):
        kept = [bank[c, j] for j in range(bank.shape[1]) if filled[c, j]]
        prototype = (sum(kept) / len(kept)).tolist() if kept else None
        negatives = [queue[c, j].tolist() for j in range(queue.shape[1]) if queue_filled[c, j]]
        per_class.append(
            [nce_reference(anchors[c, i].tolist(), [prototype], negatives, 0.5)
             for i in range(n) if anchor_mask[c, i] and prototype is not None]
        )  # fmt: skip
    assert per_class[2] == [0.0, 0.0]  # no negatives: the term is -log 1
    got = L.negative_queue_loss(*flat(anchors, anchor_mask), bank, filled, queue, queue_filled, 0.5)
    assert got.item() == pytest.approx(class_mean(per_class), rel=1e-5)


# ------------------------------------------------------------------------------------------- queue
def test_queue_is_a_fifo_per_class_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(11)
    K, size, D = 3, 4, 2
    queue = L.ClassQueue.empty(K, size, D)
    reference = [[] for _ in range(K)]  # the entries of each class, oldest first
    for _ in range(6):
        features = torch.randn(K, 3, D, generator=g)
        chosen = torch.rand(K, 3, generator=g) > 0.4
        before = queue.state_dict()
        saved = {k: v.clone() for k, v in before.items()}
        queue.push(features, chosen)
        assert all(torch.equal(before[k], saved[k]) for k in saved), "push wrote into a saved state"
        for c in range(K):
            reference[c] += [features[c, j] / features[c, j].norm() for j in range(3) if chosen[c, j]]
            reference[c] = reference[c][-size:]
        for c in range(K):
            filled = queue.filled()[c]
            assert int(filled.sum()) == len(reference[c])
            # oldest first: start at the head once the row is full, at slot 0 before
            start = int(queue.head[c]) if len(reference[c]) == size else 0
            rows = [queue.features[c, (start + j) % size] for j in range(len(reference[c]))]
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rows, reference[c]))
    torch.save(queue.state_dict(), tmp_path / "q.pt")
    other = L.ClassQueue.empty(K, size, D)
    other.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert all(torch.equal(getattr(other, k), getattr(queue, k)) for k in ("features", "count", "head"))
    with pytest.raises(ValueError, match=r"shape \(3, 4, 2\).*\(3, 5, 2\)"):
        L.ClassQueue.empty(K, 5, D).load_state_dict(queue.state_dict())
    with pytest.raises(ValueError, match="cannot push 5 entries"):
        queue.push(torch.zeros(K, 5, D), torch.ones(K, 5, dtype=torch.bool))


def test_queue_gathers_every_rank_under_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(ctt_ranks.worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the ranks' banks differ"
    # one process pushing both ranks' candidates, rank 0's first, ends the same
    one = L.ClassQueue.empty(3, 4, 4)
    one.push(torch.ones(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))
    (f0, c0), (f1, c1) = ctt_ranks.rank_candidates(0), ctt_ranks.rank_candidates(1)
    one.push(torch.cat([f0, f1], dim=1), torch.cat([c0, c1], dim=1))
    assert all(torch.allclose(getattr(one, k).float(), r0[k].float()) for k in r0)
    assert r0["count"].tolist() == [4, 3, 4]
    # class 0: 4 slots, 2 old entries, then rank 0's one and rank 1's two: the oldest goes, in slot 0
    unit = torch.nn.functional.normalize
    expected = [
        unit(f1[0, 1], dim=0),
        unit(torch.ones(4), dim=0),
        unit(f0[0, 0], dim=0),
        unit(f1[0, 0], dim=0),
    ]
    torch.testing.assert_close(r0["features"][0], torch.stack(expected))
    # class 1: rank 1's candidate in its second position lands in the first free slot
    torch.testing.assert_close(r0["features"][1, 2], unit(f1[1, 1], dim=0))


# ------------------------------------------------------------------------------------------ the step
def make_ctt(tiny_config, *overrides):
    """CTT with its four tiny networks attached as the engine would (teachers without gradient)."""
    from CTT import CTT
    from util.config import load_config
    from util.losses import cross_entropy

    cfg = load_config(tiny_config, list(overrides))
    method = CTT(cfg, cross_entropy, torch.device("cpu"))
    networks = method.networks()
    for net in networks.frozen.values():
        net.requires_grad_(False)
    method.attach(networks.all, networks.all)
    return method, networks


def fill_banks(method, seed=0):
    """Every class of both banks and queues holds a few random entries."""
    g = torch.Generator().manual_seed(seed)
    K, dim = method.nclass, method.cfg["head_channels"]
    for queue in (*method.memory.banks.values(), *method.memory.queues.values()):
        queue.push(torch.randn(K, 3, dim, generator=g), torch.ones(K, 3, dtype=torch.bool))


def count_forwards(networks):
    calls = {name: 0 for name in networks.all}
    for name, net in networks.all.items():
        module = getattr(net, "module", net)

        def hook(*_, name=name):
            calls[name] += 1

        module.register_forward_hook(hook)
    return calls


TERMS = {
    "released": {"sup_a", "ct_a", "sup_b", "ct_b"},
    "paper": {"sup_a", "ct_a", "hc_a", "lc_a", "sup_b", "ct_b", "hc_b", "lc_b"},
    "default": {"sup_a", "ct_a", "hc_a", "lc_a", "neg_a", "sup_b", "ct_b", "hc_b", "lc_b", "neg_b"},
}


@pytest.mark.parametrize("preset", ["released", "paper", "default"])
def test_step_runs_the_forwards_its_terms_need_and_no_other(tiny_config, preset):
    method, networks = make_ctt(
        tiny_config, f"ctt.preset={preset}", "ctt.contrast_thresh=0.3", "ctt.bank_thresh=0"
    )
    fill_banks(method)
    calls = count_forwards(networks)
    losses, stats = method.step(make_batch(B=2, H=33, W=33, K=6))
    assert set(losses) == TERMS[preset]
    assert all(torch.isfinite(v) for v in losses.values())
    # one forward per student (labeled + mixed view as one batch), one per teacher (weak view)
    assert calls == {"student_a": 1, "student_b": 1, "teacher_a": 1, "teacher_b": 1}
    banks = {n: q.state_dict() for n, q in method.memory.banks.items()}
    method.after_optimizer_step()
    assert all(t.updates == 1 for t in (method.teacher_a, method.teacher_b))
    assert calls == {"student_a": 1, "student_b": 1, "teacher_a": 1, "teacher_b": 1}
    assert all(torch.equal(q.features, banks[n]["features"]) for n, q in method.memory.banks.items())
    # the updated teachers' forward of that labeled batch feeds the banks (none when released): it joins
    # the next step's weak-view forward, one forward per network again
    assert (method.bank_input is None) == (preset == "released")
    method.step(make_batch(B=2, H=33, W=33, K=6, seed=1))
    assert calls == {"student_a": 2, "student_b": 2, "teacher_a": 2, "teacher_b": 2}
    fed = not all(torch.equal(q.features, banks[n]["features"]) for n, q in method.memory.banks.items())
    assert fed == (preset != "released")


def test_banks_fed_in_the_next_teacher_pass_equal_a_forward_of_their_own(tiny_config):
    """The eval-mode teachers' bank forward, folded into the next step's weak-view pass, fills the banks
    (and so the next contrast terms) as a separate forward after the optimizer step does."""
    overrides = ["ctt.contrast_thresh=0.3", "ctt.bank_thresh=0", "ctt.teacher_mode=eval"]
    results = []
    for fold in (True, False):
        method, _ = make_ctt(tiny_config, *overrides)
        assert method.fold_bank_forward
        method.fold_bank_forward = fold
        torch.manual_seed(0)
        method.step(make_batch(B=2, H=33, W=33, K=6))
        method.after_optimizer_step()
        torch.manual_seed(1)
        losses, _ = method.step(make_batch(B=2, H=33, W=33, K=6, seed=1))
        assert all(int(q.count.sum()) > 0 for q in method.memory.banks.values())
        results.append(({n: q.state_dict() for n, q in method.memory.banks.items()}, losses))
    (banks, losses), (banks_alone, losses_alone) = results
    for n in "ab":
        assert torch.equal(banks[n]["count"], banks_alone[n]["count"])
        torch.testing.assert_close(banks[n]["features"], banks_alone[n]["features"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses, losses_alone, atol=1e-5, rtol=1e-4)


def test_train_mode_teachers_feed_their_own_banks_from_a_forward_of_the_labeled_batch_alone(tiny_config):
    """A train-mode teacher normalises by its batch's statistics, so its bank forward cannot join the weak
    images: after the optimizer step each updated teacher runs the labeled batch alone, and its bank takes
    the pixels it gets right (bank_thresh 0), the bank_per_step most confident per class, as unit vectors
    of its decoder feature. Recomputed here with loops over the stride-4 grid (33 = 4 * 9 - 3)."""
    method, networks = make_ctt(tiny_config, "ctt.contrast_thresh=0.3", "ctt.bank_thresh=0",
                                "ctt.teacher_mode=train")  # fmt: skip
    batch = make_batch(B=2, H=33, W=33, K=6)
    torch.manual_seed(0)
    method.step(batch)
    assert all(int(q.count.sum()) == 0 for q in method.memory.banks.values())
    method.after_optimizer_step()
    assert method.bank_input is None, "the next step's teacher pass has nothing left to feed"
    img_x, mask_x = batch["labeled"]
    label = mask_x[:, ::4, ::4]
    per_step = method.cfg["batch_size"]
    for name in "ab":
        teacher = networks.all[f"teacher_{name}"]
        assert teacher.training
        with torch.no_grad():  # batch statistics: the running ones this forward moves do not matter
            out = teacher(img_x, features=True)
        expected = {}
        for b, y, x in [(b, y, x) for b in range(2) for y in range(9) for x in range(9)]:
            prob = out.logits_low[b, :, y, x].softmax(dim=0)
            if label[b, y, x] != 255 and int(prob.argmax()) == int(label[b, y, x]):
                feature = torch.nn.functional.normalize(out.decoder[b, :, y, x], dim=0)
                expected.setdefault(int(label[b, y, x]), []).append((float(prob.max()), feature))
        assert expected, "the teacher gets no pixel right: nothing to compare"
        bank = method.memory.banks[name]
        for c in range(method.nclass):
            chosen = [f for _, f in sorted(expected.get(c, []), key=lambda e: -e[0])[:per_step]]
            assert int(bank.count[c]) == len(chosen), f"bank {name}, class {c}"
            for j, feature in enumerate(chosen):
                torch.testing.assert_close(bank.features[c, j], feature, atol=1e-5, rtol=1e-4)


def test_gradients_reach_each_student_through_its_own_terms_only(tiny_config):
    method, networks = make_ctt(
        tiny_config, "ctt.contrast_thresh=0.3", "ctt.lc_peer_confident=false", "ctt.ct_thresh=0"
    )
    fill_banks(method)
    for teacher in networks.frozen.values():  # let autograd see the teachers: no term may reach them
        teacher.requires_grad_(True)
    losses, _ = method.step(make_batch(B=2, H=33, W=33, K=6))
    params = {name: [p for p in net.parameters()] for name, net in networks.all.items()}
    for term, value in losses.items():
        own = "student_" + term[-1]
        grads = torch.autograd.grad(value, [p for ps in params.values() for p in ps], allow_unused=True,
                                    retain_graph=True)  # fmt: skip
        reached, start = set(), 0
        for name, ps in params.items():
            if any(g is not None and g.abs().sum() > 0 for g in grads[start : start + len(ps)]):
                reached.add(name)
            start += len(ps)
        assert value.item() > 0, term
        assert reached == {own}, f"{term} reaches {reached}"


# ------------------------------------------------------------------------ the step, pixel by pixel
def pointwise_ctt(K=3, C=4, seeds=(84, 54, 78, 86), **ctt):
    """CTT over per-pixel networks (tests/pointwise.py): two students and two EMA teachers, each with
    weights of its own (`seeds`: students A, B, teachers A, B, drawn so that every term has anchors on the
    test's batch), attached as the engine would; banks and queues hold three entries per class."""
    from CTT import CTT
    from tests.pointwise import PointwiseNet
    from util.config import defaults
    from util.ema import ema_teacher
    from util.losses import cross_entropy

    cfg = {**defaults(), "nclass": K, "head_channels": C, "batch_size": 3}
    cfg["ctt"] = {**cfg["ctt"], **ctt}
    method = CTT(cfg, cross_entropy, torch.device("cpu"))
    nets = {
        "student_a": PointwiseNet(K, C, seed=seeds[0]),
        "student_b": PointwiseNet(K, C, seed=seeds[1]),
        "teacher_a": ema_teacher(PointwiseNet(K, C, seed=seeds[2]), cfg["ctt"]["ema_decay"]),
        "teacher_b": ema_teacher(PointwiseNet(K, C, seed=seeds[3]), cfg["ctt"]["ema_decay"]),
    }
    method.attach(nets, nets)
    fill_banks(method, seed=35)
    return method, nets


def inputs_of(nets):
    """{name: [the input of each forward]} of the networks, filled as they run."""
    seen = {name: [] for name in nets}
    for name, net in nets.items():
        module = getattr(net, "module", net)
        module.register_forward_hook(lambda _, args, out, name=name: seen[name].append(args[0]))
    return seen


def entries_of(queue):
    """[(class, entry as a list)] of a ClassQueue's filled slots."""
    filled = queue.filled()
    return [(c, queue.features[c, j].tolist()) for c, j in filled.nonzero().tolist()]


def info_nce_reference(anchors, tau):
    """Class-balanced InfoNCE of anchors [(class, vector, positives, negatives)]: an anchor without
    positives does not count; the mean over a class's anchors, then over the classes."""
    per_class = {}
    for c, anchor, positives, negatives in anchors:
        if positives:
            per_class.setdefault(c, []).append(nce_reference(anchor, positives, negatives, tau))
    assert per_class, "no anchor: the term is zero whatever the code does"
    return class_mean(list(per_class.values()))


def of_class(entries, c):
    return [e for k, e in entries if k == c]


def not_of_class(entries, c):
    return [e for k, e in entries if k != c]


def prototype_of(entries, c):
    """[the mean of class c's entries] (empty without any)."""
    kept = of_class(entries, c)
    return [[sum(e[d] for e in kept) / len(kept) for d in range(len(kept[0]))]] if kept else []


def test_step_terms_of_both_students_equal_the_loop_reference_and_teachers_follow_their_own_student():
    """One CTT step on per-pixel networks, both students, every term, recomputed with loops:

    - S_A sees strong view 1 ClassMixed by teacher B's pseudo-label (S_B: view 2, teacher A); which pixels
      were pasted is read from the image S_A saw, and must be the valid pixels of half (rounded down) of
      the classes teacher B predicts on the pasted image; the targets are mixed the same way;
    - CT = (the view's share of pixels at least ct_thresh sure) x mean CE over its valid pixels;
    - HC: labeled pixels (ground truth) and mixed pixels at least gamma sure against the student's bank;
      the unreliable negatives: the same anchors against their class's prototype and negative queue;
      LC: mixed pixels below gamma whose peer student is at least gamma sure and surer, showing the same
      source pixel in both mixed images, against the peer's feature and both banks' other classes;
    - then each teacher follows its own student, and each queue takes its own teacher's features.
    Three images, so that pasting from image i - 1 instead of i + 1 differs; every weight differs."""
    from tests.pointwise import assert_terms, ce, maps, mean_ce, pixels, softmax, vec

    gamma, ct_thresh, weights = 0.75, 0.8, {"hc": 0.3, "lc": 0.5, "neg": 0.7}
    method, nets = pointwise_ctt(
        contrast_thresh=gamma, ct_thresh=ct_thresh, hc_weight=0.3, lc_weight=0.5, neg_weight=0.7,
        neg_skip_top=1, unreliable_start=0.5,
    )  # fmt: skip
    banks = {n: entries_of(q) for n, q in method.memory.banks.items()}
    queues = {n: entries_of(q) for n, q in method.memory.queues.items()}
    seen = inputs_of(nets)
    batch = make_batch(B=3, H=4, W=5, K=3, seed=36)
    torch.manual_seed(0)  # ClassMix's draws of the classes to paste (the reference reads them off the image)
    losses, stats = method.step(batch)

    img_x, mask_x = batch["labeled"]
    img_u_w, img_s1, img_s2, ignore = batch["unlabeled"][:4]
    B = img_x.shape[0]
    assert all(torch.equal(seen[f"teacher_{n}"][0], img_u_w) for n in "ab"), "teachers see the weak view"
    teacher = {}  # name -> {pixel: (label, confidence)} of the weak view
    for n in "ab":
        logits = maps(nets[f"teacher_{n}"].module, img_u_w)[1]
        teacher[n] = {p: max(((k, v) for k, v in enumerate(softmax(vec(logits, *p)))), key=lambda kv: kv[1])
                      for p in pixels(ignore)}  # fmt: skip

    views, pasted_somewhere = {}, False
    for s, peer_teacher, strong in (("a", "b", img_s1), ("b", "a", img_s2)):
        (student_input,) = seen[f"student_{s}"]
        assert torch.equal(student_input[:B], img_x)
        mixed = student_input[B:]
        labels = teacher[peer_teacher]
        paste, view = {}, {}
        for b, y, x in pixels(ignore):
            own = torch.equal(mixed[b, :, y, x], strong[b, :, y, x])
            assert own or torch.equal(mixed[b, :, y, x], strong[(b + 1) % B, :, y, x]), "not ClassMix"
            paste[b, y, x] = own
            src = b if own else (b + 1) % B
            view[b, y, x] = (*labels[src, y, x], bool(ignore[src, y, x] != 255))
        for b in range(B):  # ClassMix: the valid pixels of n // 2 of the n classes the cross teacher sees
            image = [p for p in pixels(ignore) if p[0] == b]
            present = {labels[p][0] for p in image if ignore[p] != 255}
            chosen = {labels[p][0] for p in image if paste[p]}
            assert len(chosen) == len(present) // 2
            assert all(paste[p] == (ignore[p] != 255 and labels[p][0] in chosen) for p in image)
            pasted_somewhere |= bool(chosen)
        features_x, logits_x, _ = maps(nets[f"student_{s}"], img_x)
        features_u, logits_u, _ = maps(nets[f"student_{s}"], mixed)
        views[s] = {"paste": paste, "view": view, "features_u": features_u, "logits_u": logits_u,
                    "features_x": features_x, "logits_x": logits_x}  # fmt: skip
    assert pasted_somewhere, "ClassMix pasted nothing: the label and the image could be mixed differently"

    expected = {}
    for s, peer in (("a", "b"), ("b", "a")):
        v, pv = views[s], views[peer]
        valid = [p for p in pixels(ignore) if v["view"][p][2]]
        weight = sum(v["view"][p][1] >= ct_thresh for p in valid) / len(valid)
        assert 0 < weight < 1
        expected[f"sup_{s}"] = mean_ce(v["logits_x"], mask_x)
        expected[f"ct_{s}"] = (
            weight * sum(ce(vec(v["logits_u"], *p), v["view"][p][0]) for p in valid) / len(valid)
        )

        # HC and the unreliable negatives share their anchors
        anchors = [(int(mask_x[p]), vec(v["features_x"], *p)) for p in pixels(mask_x) if mask_x[p] != 255]
        anchors += [(v["view"][p][0], vec(v["features_u"], *p)) for p in valid if v["view"][p][1] >= gamma]
        bank, queue = banks[s], queues[s]
        hc = info_nce_reference([(c, a, of_class(bank, c), not_of_class(bank, c)) for c, a in anchors], 0.1)
        neg = info_nce_reference([(c, a, prototype_of(bank, c), of_class(queue, c)) for c, a in anchors], 0.5)

        # LC: the peer student's confidence and label of the same pixel of its own mixed image
        lc_anchors, both_banks = [], banks["a"] + banks["b"]
        for p in valid:
            own_conf = max(softmax(vec(v["logits_u"], *p)))
            peer_label, peer_conf = max(enumerate(softmax(vec(pv["logits_u"], *p))), key=lambda kv: kv[1])
            if (pv["view"][p][2] and v["paste"][p] == pv["paste"][p] and v["view"][p][1] < gamma
                    and peer_conf >= gamma and peer_conf > own_conf):  # fmt: skip
                anchor, positive = vec(v["features_u"], *p), vec(pv["features_u"], *p)
                lc_anchors.append((peer_label, anchor, [positive], not_of_class(both_banks, peer_label)))
        lc = info_nce_reference(lc_anchors, 0.5)
        expected.update({f"hc_{s}": weights["hc"] * hc, f"neg_{s}": weights["neg"] * neg,
                         f"lc_{s}": weights["lc"] * lc})  # fmt: skip
    assert_terms(losses, expected, rel=1e-4)
    assert stats["ct_weight_a"].item() != stats["ct_weight_b"].item()

    # After the optimizer step (here: each student moved at random), each teacher's first update copies
    # its own student; each queue takes features of its own teacher's view of the weak images.
    g = torch.Generator().manual_seed(37)
    with torch.no_grad():
        for s in "ab":
            for p in nets[f"student_{s}"].parameters():
                p.add_(torch.randn(p.shape, generator=g))
    teacher_features = {n: maps(nets[f"teacher_{n}"].module, img_u_w)[0] for n in "ab"}
    method.after_optimizer_step()
    for s in "ab":
        student, followed = nets[f"student_{s}"], nets[f"teacher_{s}"]
        assert followed.updates == 1
        assert all(torch.equal(a, b) for a, b in zip(followed.module.parameters(), student.parameters())), (
            f"teacher {s} does not follow student {s}"
        )
    for n in "ab":
        new = [e for e in entries_of(method.memory.queues[n]) if e not in queues[n]]
        assert new, f"queue {n} took no negative"
        for other in "ab":
            units = [torch.nn.functional.normalize(teacher_features[other][b, :, y, x], dim=0)
                     for b, y, x in pixels(ignore)]  # fmt: skip
            matches = [any(torch.allclose(torch.tensor(e), u, atol=1e-6) for u in units) for _, e in new]
            assert all(matches) == (other == n), f"queue {n} holds teacher {other}'s features"


def test_ctt_config_is_checked(tiny_config):
    from util.config import ConfigError

    with pytest.raises(ConfigError, match="'ctt.deploy' names 'teacher_c'"):
        make_ctt(tiny_config, "ctt.deploy=[teacher_a, teacher_c]")
    with pytest.raises(ConfigError, match="'ctt.bank_per_step'.*do not fit in a queue of 4"):
        make_ctt(tiny_config, "ctt.bank_size=4", "ctt.bank_per_step=5")
    with pytest.raises(ConfigError, match="'ctt.pretrained_b': .*does not exist"):
        make_ctt(tiny_config, "ctt.pretrained_b=/nonexistent.pth")
    with pytest.raises(ConfigError, match="ctt.preset' must be one of"):
        make_ctt(tiny_config, "ctt.preset=both")


# ------------------------------------------------------------------------------------------- real runs
# Banks and queues fill within a few steps of the tiny run; the networks are random, so the confidence
# thresholds are lowered for the contrastive terms to have anchors and the CT term a weight.
FILL = ["ctt.bank_thresh=0", "ctt.contrast_thresh=0.3", "ctt.ct_thresh=0.3", "ctt.bank_size=8",
        "ctt.neg_queue_size=8", "ctt.neg_per_step=2"]  # fmt: skip


def test_skipped_step_leaves_banks_teachers_and_their_statistics_as_they_were(tiny_config):
    from CTT import CTT
    from util.config import load_config
    from util.engine import Trainer

    cfg = load_config(tiny_config, ["max_iters=3", "ctt.teacher_mode=train", *FILL])
    trainer = Trainer(CTT, cfg, None)
    try:
        batches = trainer.batches(0, 0)
        trainer.train_step(next(batches))
        method = trainer.method
        before = {k: v.clone() for k, v in trainer.networks.all["teacher_a"].state_dict().items()
                  if k != "_extra_state"}  # fmt: skip
        state = {k: {n: {f: t.clone() for f, t in q.items()} for n, q in v.items()}
                 for k, v in method.state_dict().items()}  # fmt: skip
        assert int(state["banks"]["a"]["count"].sum() + state["banks"]["b"]["count"].sum()) > 0
        step = method.step

        def poisoned(batch):
            losses, stats = step(batch)  # the train-mode teachers move their BN statistics in here
            losses["ct_b"] = losses["ct_b"] * float("nan")
            return losses, stats

        method.step = poisoned
        trainer.train_step(next(batches))
        assert trainer.guard.steps == 1
        after = trainer.networks.all["teacher_a"].state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), "the teacher moved"
        assert method.teacher_a.updates == 1 and same(state, method.state_dict()), "the banks moved"
    finally:
        torch.use_deterministic_algorithms(False)


def test_two_processes_stay_identical_and_resume_bit_identically_after_sigkill(tiny_config, tmp_path):
    from tests.test_training import run

    straight, killed, dump = tmp_path / "straight", tmp_path / "killed", tmp_path / "dump"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # 18 unlabeled images / 2 ranks / batch 2: 4 iterations per epoch; checkpoints at 2 and 4 only
    command = [*torchrun, "tests/run_training.py", "CTT", "--config", tiny_config, "max_iters=4",
               "eval_interval=2", "save_interval=0", *FILL]  # fmt: skip
    run([*command, "--save-path", str(straight), "--dump-weights", str(dump)])
    # rank 1 is SIGKILLed before iteration 3 (inside the first epoch); the same command resumes from 2
    run([*command, "--save-path", str(killed), "--kill-at", "3", "--kill-rank", "1"], expect=1)
    log = run([*command, "--save-path", str(killed)])
    assert "resumed from" in log and "at iteration 2/4" in log

    a, b = (torch.load(d / "latest.pth", weights_only=True) for d in (straight, killed))
    assert same(a["networks"], b["networks"]), "the resumed run ended with other weights"
    assert same(a["method"], b["method"]), "the resumed run ended with other banks or queues"
    for kind in ("banks", "queues"):
        assert all(int(a["method"][kind][n]["count"].sum()) > 0 for n in "ab"), kind
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert same(r0, r1), "the ranks' networks differ"
    best = torch.load(straight / "best.pth", weights_only=True)
    assert best["network"] in ("teacher_a", "teacher_b") and "classifier.weight" in best["model"]
