"""CISC-R: its building blocks against loop computations of the formulas; the steps of stage 1, stages 4/6
and the online variant on per-pixel networks against loops, and the online EMA teacher; the labeled-only
query; the staged pipeline as real processes (all stages in one command, which network teaches and labels
each stage, stop signals and SIGKILLs at every kind of moment resumed to identical weights, two gloo
processes), plus the online variant under two processes."""

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from CISCR import CrossImageSupervised, RectifiedSelfTraining, stage1_epoch, stage_config, stage_epochs
from dataset.query import LabeledClasses, PartnerQuery, covering
from dataset.semi import read_split
from model import build_model
from tests.conftest import make_method
from tests.pointwise import PointwiseNet, assert_terms, ce, maps, mean_ce, pixels, vec
from tests.test_faults import wait_for
from tests.test_training import ROOT, TINY, run, weights
from tests.test_unimatch_step import make_batch
from util.config import ConfigError, defaults, load_config
from util.engine import EXIT_BAD_INPUT, EXIT_REQUEUE
from util.engine.stages import combined_evals
from util.labelling import label_file
from util.losses import cross_entropy
from util.losses.ciscr import (
    choose_shared_classes,
    cisc_map,
    class_prototypes,
    class_scores,
    cross_image_consistency,
    masked_average,
    rectified_cross_entropy,
    rectify_weight,
    region_of,
    reliability,
)


# ------------------------------------------------------------------------------ loop references
def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (max(na, 1e-6) * max(nb, 1e-6))


def bce(p, t):
    p = min(max(p, 0.0), 1.0)
    log_p = max(math.log(p), -100) if p > 0 else -100
    log_q = max(math.log(1 - p), -100) if p < 1 else -100
    return -(t * log_p + (1 - t) * log_q)


def up(maps, size):
    """The reference resize: F.interpolate itself (bilinear, align_corners=True)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=True)


def masked_average_reference(feature, mask):
    """Upsample the whole feature to the mask, then average it over the mask pixel by pixel."""
    B, C = feature.shape[:2]
    H, W = mask.shape[-2:]
    big = up(feature, (H, W))
    out = torch.zeros(B, C)
    for b in range(B):
        total, area = [0.0] * C, 0.0
        for i in range(H):
            for j in range(W):
                if mask[b, i, j]:
                    area += 1
                    total = [t + float(v) for t, v in zip(total, big[b, :, i, j])]
        out[b] = torch.tensor([t / (area + 5e-4) for t in total])
    return out


def cosine_map_reference(feature, prototypes):
    """(B, K, h, w) cosine of each feature pixel with each of the image's prototypes (B, K, C)."""
    B, _, h, w = feature.shape
    K = prototypes.shape[1]
    out = torch.zeros(B, K, h, w)
    for b in range(B):
        for k in range(K):
            for i in range(h):
                for j in range(w):
                    out[b, k, i, j] = cosine(feature[b, :, i, j].tolist(), prototypes[b, k].tolist())
    return out


def tiny_maps(seed=0, B=2, C=4, h=5, w=6, H=17, W=21, K=3):
    g = torch.Generator().manual_seed(seed)
    feature_u = torch.rand(B, C, h, w, generator=g)  # non-negative, like the decoder's post-ReLU feature
    feature_q = torch.rand(B, C, h, w, generator=g)
    region_u = torch.rand(B, H, W, generator=g) > 0.6
    region_q = torch.rand(B, H, W, generator=g) > 0.5
    region_q[1] = False  # a pair without a shared class
    region_u[1] = False
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[0, :2] = 255  # padding rows
    return feature_u, feature_q, region_u, region_q, label


def test_cisc_map_and_consistency_match_loops():
    feature_u, feature_q, region_u, region_q, label = tiny_maps()
    size = region_u.shape[-2:]
    prototype = masked_average(feature_q, region_q)
    assert torch.allclose(prototype, masked_average_reference(feature_q, region_q), atol=1e-5)
    cisc = cisc_map(feature_u, prototype, size)
    expected = up(cosine_map_reference(feature_u, prototype[:, None]), size)[:, 0]
    assert torch.allclose(cisc, expected, atol=1e-5)
    assert cisc.min() >= 0 and torch.equal(cisc[1], torch.zeros_like(cisc[1]))  # no shared class: S = 0

    valid = label != 255
    terms = [bce(float(cisc[b, i, j]), float(region_u[b, i, j])) for b, i, j in valid.nonzero().tolist()]
    loss = cross_image_consistency(cisc, region_u, valid)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_rectified_weights_and_loss_match_loops():
    feature_u, feature_q, region_u, region_q, label = tiny_maps(seed=1)
    B, H, W = label.shape
    cisc = cisc_map(feature_u, masked_average(feature_q, region_q), (H, W))
    weight = rectify_weight(cisc, region_u)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                m, s = float(region_u[b, i, j]), float(cisc[b, i, j])
                assert weight[b, i, j].item() == pytest.approx(1 - abs(m - s), abs=1e-6)
    assert torch.equal(weight[1], torch.ones_like(weight[1]))  # no shared class: plain CE

    logits = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(2))
    valid = label != 255
    total = 0.0
    for b, i, j in valid.nonzero().tolist():
        values = logits[b, :, i, j].tolist()
        log_z = math.log(sum(math.exp(v) for v in values))
        total += weight[b, i, j].item() * (log_z - values[label[b, i, j]])
    for count_all, count in ((False, valid.sum().item()), (True, B * H * W)):
        loss = rectified_cross_entropy(logits, label, weight, valid, count_all)
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # With weight 1 it is the plain cross-entropy.
    plain = rectified_cross_entropy(logits, label, torch.ones_like(weight), valid)
    assert plain.item() == pytest.approx(cross_entropy(logits, label).item(), rel=1e-6)


def test_consistency_gradient_reaches_both_images_and_rectification_none():
    feature_u, feature_q, region_u, region_q, label = tiny_maps(seed=3)
    feature_u.requires_grad_(True)
    feature_q.requires_grad_(True)
    cisc = cisc_map(feature_u, masked_average(feature_q, region_q), label.shape[-2:])
    cross_image_consistency(cisc, region_u, label != 255).backward()
    # As released, nothing is detached: the map's pixels and the partner's prototype both learn (the
    # pair without a shared class gives no gradient).
    assert feature_u.grad[0].abs().sum() > 0 and feature_q.grad[0].abs().sum() > 0
    assert feature_u.grad[1].abs().sum() == 0 and feature_q.grad[1].abs().sum() == 0


def test_prototypes_scores_and_reliability_match_loops():
    feature, _, _, _, label = tiny_maps(seed=4)
    B, C, h, w = feature.shape
    K, (H, W) = 3, label.shape[-2:]
    prototypes = class_prototypes(feature, label, K)
    expected = torch.zeros(K, C)
    for k in range(K):
        expected[k] = masked_average_reference(feature, label == k).sum(dim=0)
    assert torch.allclose(prototypes, expected, atol=1e-5)

    scores = class_scores(feature, prototypes, label)
    cos = up(cosine_map_reference(feature, prototypes.expand(B, -1, -1)), (H, W))
    for b in range(B):
        pixels = [(i, j) for i in range(H) for j in range(W) if label[b, i, j] != 255]
        for k in range(K):
            values = [bce(float(cos[b, k, i, j]), float(label[b, i, j] == k)) for i, j in pixels]
            assert scores[b, k].item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    pseudo = label.clone()
    pseudo[1][pseudo[1] == 2] = 0  # image 1 without class 2
    score = reliability(scores, pseudo)
    for b in range(B):
        present = {int(c) for c in pseudo[b].unique() if c != 255}
        assert score[b].item() == pytest.approx(sum(scores[b, k].item() for k in present), rel=1e-6)


@pytest.mark.parametrize("exclude_background, count", [(False, 1), (True, 1), (True, 2)])
def test_shared_class_choice_and_regions_match_loop(exclude_background, count):
    g = torch.Generator().manual_seed(5)
    B, K, H, W, min_area = 6, 5, 10, 10, 0.05
    label_u = torch.randint(0, K, (B, H, W), generator=g)
    label_q = torch.randint(0, K, (B, H, W), generator=g)
    label_u[0] = 0  # only background
    label_q[1, :, :] = 255
    label_q[2, :9] = 3  # class 3 and a sliver (< 5%) of others
    label_u[2, :1] = 3  # 10% of class 3
    noise = torch.rand(B, K, generator=g)
    chosen = choose_shared_classes(label_u, label_q, K, min_area, exclude_background, noise, count)
    for b in range(B):
        au = [(label_u[b] == k).float().mean().item() for k in range(K)]
        aq = [(label_q[b] == k).float().mean().item() for k in range(K)]
        candidates = [k for k in range(K) if au[k] >= min_area and aq[k] >= min_area]
        candidates = [k for k in candidates if not (exclude_background and k == 0)]
        expected = sorted(candidates, key=lambda k: -noise[b, k].item())[:count]
        assert sorted(chosen[b].nonzero().flatten().tolist()) == sorted(expected)
    assert chosen[1].sum() == 0 and chosen[2].tolist() == [k == 3 for k in range(K)]
    region = region_of(label_q, chosen)
    for b in range(B):
        keep = chosen[b].nonzero().flatten().tolist()
        assert torch.equal(region[b], torch.isin(label_q[b], torch.tensor(keep, dtype=torch.long)))


# ------------------------------------------------------------------------------ the steps, pixel by pixel
def prototype_reference(feature, region, b):
    """The masked average of image b's feature (B, C, H, W) over its region (B, H, W): sum / (area + 5e-4)."""
    inside = [(y, x) for y in range(region.shape[1]) for x in range(region.shape[2]) if region[b, y, x]]
    return [sum(float(feature[b, c, y, x]) for y, x in inside) / (len(inside) + 5e-4)
            for c in range(feature.shape[1])]  # fmt: skip


def cisc_reference(feature, feature_q, region_q):
    """S(x | x_q, m_q) (B, H, W): the cosine of each pixel's feature with the partner's prototype."""
    B, _, H, W = feature.shape
    out = torch.zeros(B, H, W)
    for b in range(B):
        prototype = prototype_reference(feature_q, region_q, b)
        for y in range(H):
            for x in range(W):
                out[b, y, x] = cosine(vec(feature, b, y, x), prototype)
    return out


def pointwise_pair(seed, B=2, K=3, H=4, W=5):
    """Images, labels with padding, and regions of class 1 on both sides of each pair (image 1 of the
    partners shows none: an empty prototype)."""
    g = torch.Generator().manual_seed(seed)
    img, img_q = torch.randn(B, 3, H, W, generator=g), torch.randn(B, 3, H, W, generator=g)
    label, label_q = torch.randint(0, K, (2, B, H, W), generator=g)
    label[:, -1] = 255  # padding rows
    label_q[1][label_q[1] == 1] = 2
    return img, label, img_q, label_q, label == 1, label_q == 1


def test_stage1_step_equals_the_loop_reference():
    """Stage 1: CE of both images of each pair, plus w [BCE(S(x | x_q, m_q), m) + BCE(S(x_q | x, m), m_q)],
    each BCE a mean over its image's labeled pixels."""
    net = PointwiseNet(nclass=3, seed=11)
    cfg = {**defaults(), "nclass": 3, "ciscr": {**defaults()["ciscr"], "consistency_weight": 0.5}}
    method = make_method(CrossImageSupervised, net, cfg, cross_entropy)
    img, label, img_q, label_q, region, region_q = pointwise_pair(seed=12)
    losses, stats = method.step({"labeled": (img, label, img_q, label_q, region, region_q)})

    (feature, logits, _), (feature_q, logits_q, _) = maps(net, img), maps(net, img_q)
    cisc, cisc_q = cisc_reference(feature, feature_q, region_q), cisc_reference(feature_q, feature, region)

    def consistency(s, region, label):
        terms = [bce(float(s[p]), float(region[p])) for p in pixels(label) if label[p] != 255]
        return sum(terms) / len(terms)

    expected = {
        "x": mean_ce(logits, label) + mean_ce(logits_q, label_q),
        "cisc": 0.5 * (consistency(cisc, region, label) + consistency(cisc_q, region_q, label_q)),
    }
    assert_terms(losses, expected)
    assert stats["shared"].item() == 1.0  # both crops show class 1


@pytest.mark.parametrize("denominator", ["valid", "all"])
def test_rectified_step_equals_the_loop_reference_and_trains_only_the_student(denominator):
    """Stages 4 and 6: CE of the labeled crops, and each pseudo-labeled pixel's CE weighted by
    1 - |m_u - S(x_u | x_q, m_q)|, S from the frozen teacher's features of the unlabeled crop and its
    partner; the student's own features never enter the weight."""
    student, teacher = PointwiseNet(nclass=3, seed=13), PointwiseNet(nclass=3, seed=14)
    cfg = {**defaults(), "nclass": 3, "ciscr": {**defaults()["ciscr"], "loss_denominator": denominator}}
    method = RectifiedSelfTraining(cfg, cross_entropy, torch.device("cpu"))
    method.attach({"model": student, "teacher": teacher}, {"model": student, "teacher": teacher})
    img_u, pseudo_label, img_q, label_q, region_u, region_q = pointwise_pair(seed=15)
    g = torch.Generator().manual_seed(16)
    img_x, mask_x = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 4, 5), generator=g)
    batch = {"labeled": (img_x, mask_x), "unlabeled": (img_u, pseudo_label, img_q, region_u, region_q)}
    losses, stats = method.step(batch)

    cisc = cisc_reference(maps(teacher, img_u)[0], maps(teacher, img_q)[0], region_q)
    logits_u = maps(student, img_u)[1]
    valid = [p for p in pixels(pseudo_label) if pseudo_label[p] != 255]
    weight = {p: 1 - abs(float(region_u[p]) - float(cisc[p])) for p in valid}
    total = sum(weight[p] * ce(vec(logits_u, *p), int(pseudo_label[p])) for p in valid)
    count = pseudo_label.numel() if denominator == "all" else len(valid)
    expected = {"x": mean_ce(maps(student, img_x)[1], mask_x), "u": total / count}
    assert_terms(losses, expected)
    assert stats["weight"].item() == pytest.approx(sum(weight.values()) / len(valid), rel=1e-6)
    # image 1's partner shows no class 1: its prototype is zero, S = 0, and its weights are 1 - m_u
    assert all(weight[p] == 1 - float(region_u[p]) for p in valid if p[0] == 1)

    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def online_method(student, teacher, **ciscr):
    from CISCR import OnlineCISCR

    section = {**defaults()["ciscr"], "mode": "online", **ciscr}
    cfg = {**defaults(), "nclass": 3, "conf_thresh": 0.5, "ciscr": section}
    method = OnlineCISCR(cfg, cross_entropy, torch.device("cpu"))
    method.attach({"model": student, "teacher": teacher}, {"model": student, "teacher": teacher})
    return method


def test_online_step_equals_the_loop_reference():
    """ciscr.mode=online: UniMatch's step with each unlabeled pixel's confident CE weighted by
    1 - |m_u - S|, S from the EMA teacher's features of the weak image and its labeled partner, the
    regions those of the classes both show (every such class: shared_classes = K, so the draw does not
    matter; class 0 excluded); the pasted box of each strong view keeps weight 1."""
    from tests.pointwise import UniMatchReference, mix_padded_elsewhere
    from util.ema import ema_teacher

    K = 3
    student = PointwiseNet(nclass=K, seed=17)
    teacher = ema_teacher(PointwiseNet(nclass=K, seed=18), 0.99)  # weights of its own, unlike the student
    method = online_method(student, teacher, shared_classes=K, exclude_background=True, min_class_area=0.1)
    batch = mix_padded_elsewhere(make_batch(B=2, H=4, W=5, K=K, seed=19))
    g = torch.Generator().manual_seed(20)
    img_q, label_q = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, K, (2, 4, 5), generator=g)
    losses, stats = method.step({**batch, "unlabeled": (*batch["unlabeled"], img_q, label_q)})

    reference = UniMatchReference(student, batch)

    reference.assert_informative(0.5)
    H, W = 4, 5
    pseudo = torch.full((2, H, W), 255)
    for p, (label, _, ok) in reference.weak.items():
        if ok:
            pseudo[p] = label
    region_u, region_q = torch.zeros(2, H, W, dtype=torch.bool), torch.zeros(2, H, W, dtype=torch.bool)
    for b in range(2):
        for c in range(1, K):
            area_u = sum(int(pseudo[b, y, x] == c) for y in range(H) for x in range(W)) / (H * W)
            area_q = sum(int(label_q[b, y, x] == c) for y in range(H) for x in range(W)) / (H * W)
            if area_u >= 0.1 and area_q >= 0.1:
                region_u[b] |= pseudo[b] == c
                region_q[b] |= label_q[b] == c
    assert region_u.any() and not region_u.all() and region_q.any()
    cisc = cisc_reference(
        maps(teacher.module, batch["unlabeled"][0])[0], maps(teacher.module, img_q)[0], region_q
    )
    weight = {p: 1 - abs(float(region_u[p]) - float(cisc[p])) for p in pixels(pseudo)}
    expected = {"x": mean_ce(reference.maps["labeled"][1], reference.mask_x) / 2}
    for k in (0, 1):
        box = reference.boxes[k]
        pasted = {p: 1.0 if box[p] else weight[p] for p in weight}
        logits = reference.maps["strong"][k][1]
        expected[f"s{k + 1}"] = reference.confident_ce(logits, reference.strong[k], 0.5, pasted) * 0.25 / 2
    expected["fp"] = reference.confident_ce(reference.maps["weak"][2], reference.weak, 0.5, weight) * 0.5 / 2
    assert_terms(losses, expected)
    valid = [p for p in pixels(pseudo) if pseudo[p] != 255]
    assert stats["weight"].item() == pytest.approx(sum(weight[p] for p in valid) / len(valid), rel=1e-6)


def test_online_teacher_is_an_eval_mode_ema_of_the_student_at_the_configured_decay():
    """The online teacher follows the mean-teacher formula alpha_t = min(1 - 1/(t+1), ema_decay) after each
    optimizer step: at decay 0.5 the third update already differs from the warm-up's 2/3."""
    from CISCR import OnlineCISCR

    cfg = load_config("configs/demo.yaml", ["backbone_width=8", "head_channels=16", "ciscr.mode=online",
                                            "ciscr.ema_decay=0.5"])  # fmt: skip
    method = OnlineCISCR(cfg, cross_entropy, torch.device("cpu"))
    networks = method.networks()
    method.attach(networks.all, networks.all)
    student, teacher = networks.trained["model"], networks.frozen["teacher"]
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    expected = {k: v.clone() for k, v in teacher.module.named_parameters()}
    g = torch.Generator().manual_seed(21)
    for alpha in (0.0, 0.5, 0.5, 0.5):  # alpha_t = min(1 - 1/(t+1), 0.5), t = 0, 1, 2, 3
        with torch.no_grad():  # an optimizer step of the student
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        method.after_optimizer_step()
        for name, p in student.named_parameters():
            expected[name] = alpha * expected[name] + (1 - alpha) * p.detach()
    for name, p in teacher.module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-5)
    assert teacher.updates == 4 and not teacher.training


# ------------------------------------------------------------------------------ the query (labeled only)
def demo_data(folder, drop_unlabeled_masks=True):
    """The tiny demo dataset in `folder`; the unlabeled images' masks are moved to folder/unlabeled_masks
    (put_back_unlabeled_masks), so that anything that reads one fails."""
    from dataset.demo import ensure_demo

    path = os.path.join(folder, "tiny.yaml")
    with open(path, "w") as f:
        f.write(TINY.format(root=folder) + CISCR_TINY)
    cfg = load_config(path)
    ensure_demo(cfg["data_root"], **cfg["demo"])
    if drop_unlabeled_masks:
        for _, _, mask in read_split(cfg["unlabeled_id_path"], need_mask=True):
            aside = os.path.join(folder, "unlabeled_masks", mask)
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(os.path.join(cfg["data_root"], mask), aside)
    return path, cfg


def put_back_unlabeled_masks(folder, cfg):
    """The unlabeled masks demo_data moved aside, where the split lists them (to measure pseudo-labels)."""
    for _, _, mask in read_split(cfg["unlabeled_id_path"], need_mask=True):
        aside = os.path.join(folder, "unlabeled_masks", mask)
        if os.path.isfile(aside):
            shutil.copyfile(aside, os.path.join(cfg["data_root"], mask))


CISCR_TINY = "ciscr: {stage_epochs: [1, 1, 1], exclude_background: true}\n"


def test_class_lists_hold_only_labeled_images_and_follow_the_split(tmp_path):
    _, cfg = demo_data(str(tmp_path))
    root, split, nclass = cfg["data_root"], cfg["labeled_id_path"], cfg["nclass"]
    labeled = [(image, mask) for _, image, mask in read_split(split, need_mask=True)]
    classes = LabeledClasses.load(split, root, nclass, str(tmp_path), 0.03, True)
    assert classes.images == labeled
    for c, members in classes.lists.items():
        assert c != 0 and members
        for i in members:  # each listed image shows its class on >= 3% of its pixels
            mask = np.array(Image.open(os.path.join(root, labeled[i][1])))
            assert (mask == c).mean() >= 0.03
    caches = list(tmp_path.glob("labeled_classes.*.json"))
    assert len(caches) == 1

    # A changed split gets lists of its own (another cache file); the old one stays valid for the old split.
    shorter = tmp_path / "shorter.txt"
    shorter.write_text("".join(f"{image} {mask}\n" for image, mask in labeled[1:]))
    fewer = LabeledClasses.load(str(shorter), root, nclass, str(tmp_path), 0.03, True)
    assert fewer.images == labeled[1:] and len(list(tmp_path.glob("labeled_classes.*.json"))) == 2
    # Built once: the cache answers without a mask being read.
    os.remove(os.path.join(root, labeled[0][1]))
    again = LabeledClasses.load(split, root, nclass, str(tmp_path), 0.03, True)
    assert again.lists == classes.lists


def test_draws_follow_the_concatenated_lists_and_never_pair_an_image_with_itself():
    images = [("a", "ma"), ("b", "mb"), ("c", "mc")]
    classes = LabeledClasses(images, [{1: 0.5}, {1: 0.5, 2: 0.5}, {0: 1.0}], 0.03, exclude_background=True)
    assert classes.lists == {1: [0, 1], 2: [1]}
    random.seed(0)
    draws = [classes.draw([1, 2], exclude=None) for _ in range(3000)]
    assert draws.count(1) / len(draws) == pytest.approx(2 / 3, abs=0.03)  # b is in both lists
    assert {classes.draw([1, 2], exclude=1) for _ in range(200)} == {0}
    assert {classes.draw([2], exclude=1) for _ in range(200)} == {0, 2}  # empty pool: any other image


def test_partner_regions_are_one_class_both_images_show(tmp_path):
    _, cfg = demo_data(str(tmp_path), drop_unlabeled_masks=False)
    root, nclass = cfg["data_root"], cfg["nclass"]
    classes = LabeledClasses.load(cfg["labeled_id_path"], root, nclass, None, 0.03, True)
    query = PartnerQuery(root, classes, nclass, 32, 0.03, True)
    random.seed(1)
    shared_pairs = 0
    for n in range(40):
        own_image, own_mask = classes.images[n % len(classes.images)]
        label = np.array(Image.open(os.path.join(root, own_mask)))[:32, :32].astype(np.int64)
        partner = query.for_label(label, own_image)
        region, region_q = partner.region.numpy(), partner.region_partner.numpy()
        shared = set(np.unique(label[region])) | set(np.unique(partner.mask.numpy()[region_q]))
        assert len(shared) <= 1 and region.any() == region_q.any()
        if shared:
            shared_pairs += 1
            (c,) = shared
            assert c in covering(label, nclass, 0.03, True)
            assert c in covering(partner.mask.numpy(), nclass, 0.03, True)
            assert np.array_equal(region, label == c) and np.array_equal(region_q, partner.mask.numpy() == c)
    assert shared_pairs > 20


def test_recrop_loop_stops_after_max_recrops(tmp_path, monkeypatch):
    """The release re-crops until a shared class shows, forever if it never does; here max_recrops ends it
    with empty regions."""
    import dataset.query as query_module

    _, cfg = demo_data(str(tmp_path), drop_unlabeled_masks=False)
    root, nclass = cfg["data_root"], cfg["nclass"]
    classes = LabeledClasses.load(cfg["labeled_id_path"], root, nclass, None, 0.03, True)
    real_crop, crops = query_module.T.random_crop, []

    def blank_crop(image, mask, size, mask_fill=255):  # every crop shows padding only
        crops.append(1)
        image, mask = real_crop(image, mask, size, mask_fill)
        return image, torch.full_like(mask, 255)

    monkeypatch.setattr(query_module.T, "random_crop", blank_crop)
    label = np.array(Image.open(os.path.join(root, classes.images[0][1]))).astype(np.int64)
    assert covering(label, nclass, 0.03, True)
    partner = PartnerQuery(root, classes, nclass, 32, 0.03, True, max_recrops=3).for_label(label)
    assert len(crops) == 3 and not partner.region.any() and not partner.region_partner.any()


# ------------------------------------------------------------------------------ configs
def test_stage_lengths_are_epochs_of_each_stages_own_data_as_released():
    # VOC: 80 epochs of each stage's data, as released; the staged pipeline does not read max_iters.
    assert stage_epochs(load_config("configs/pascal.yaml", ["max_iters=100"])) == [80, 80, 80]
    assert stage_epochs(load_config("configs/cityscapes.yaml")) == [160, 160, 160]
    # Stage 1's epoch: the labeled list, twice over below 200 images (VOC 1/16: 662 images, as they are).
    assert [stage1_epoch(n) for n in (12, 199, 200, 662)] == [24, 398, 200, 662]


def test_each_stage_trains_at_its_own_learning_rate():
    # Default: the config's lr for every stage, as released; stage_lr sets the three.
    pascal = load_config("configs/pascal.yaml")
    assert [stage_config(pascal, i)["lr"] for i in range(3)] == [pascal["lr"]] * 3
    cfg = load_config("configs/pascal.yaml", ["ciscr.stage_lr=[0.0005,0.002,0.003]", "max_iters=100"])
    stages = [stage_config(cfg, i) for i in range(3)]
    assert [s["lr"] for s in stages] == [0.0005, 0.002, 0.003]
    assert [(s["epochs"], s["max_iters"]) for s in stages] == [(80, None)] * 3
    assert cfg["lr"] == pascal["lr"] and cfg["max_iters"] == 100  # the pipeline's own config is untouched


def test_combined_evals_count_iterations_and_seconds_from_the_start_of_the_pipeline():
    def record(iteration, total, train, wall):
        return {"iteration": iteration, "network": "model", "total_iters": total, "train_seconds": train,
                "wall_seconds": wall, "deploy": True}  # fmt: skip

    stages = {
        "stage1": [record(5, 10, 4.0, 6.0), record(10, 10, 8.0, 12.0)],
        "stage4": [record(20, 20, 30.0, 40.0)],
        "stage6": [record(15, 30, 20.0, 25.0), {**record(30, 30, 40.0, 50.0), "wall_seconds": 55.0}],
    }
    seconds = {"stage1": 13.0, "stage2": 7.0, "stage3": 2.0, "stage4": 41.0, "stage5": 3.0, "stage6": 56.0}
    rows = combined_evals(stages, seconds)
    assert [(r["network"], r["iteration"], r["total_iters"]) for r in rows] == [
        ("stage1/model", 5, 60), ("stage1/model", 10, 60), ("stage4/model", 30, 60),
        ("stage6/model", 45, 60), ("stage6/model", 60, 60),
    ]  # fmt: skip
    assert [r["train_seconds"] for r in rows] == [4.0, 8.0, 38.0, 58.0, 78.0]
    # wall: every stage before at its duration (pseudo-labels and ranking included), then the stage's own
    assert [r["wall_seconds"] for r in rows] == [6.0, 12.0, 22.0 + 40.0, 66.0 + 25.0, 66.0 + 55.0]
    assert [r["deploy"] for r in rows] == [False, False, False, True, True]
    # Records from before the engine wrote the seconds are combined without them.
    bare = {stage: [{k: v for k, v in r.items() if "seconds" not in k} for r in records]
            for stage, records in stages.items()}  # fmt: skip
    assert all("train_seconds" not in r and "wall_seconds" not in r for r in combined_evals(bare, seconds))
    # The written pseudo-labels a stage trains on reach its records (stage 1 trains on none), as a single
    # run's records carry theirs; a record with its own keeps them.
    stage2, stage5 = (
        {"accuracy": 68.2, "miou": 26.2, "used": 100.0},
        {"accuracy": 66.8, "miou": 23.7, "used": 100.0},
    )
    stages["stage6"][0]["pseudo_labels"] = {"s": {"accuracy": 90.0}}
    rows = combined_evals(stages, seconds, {"stage4": {"written": stage2}, "stage6": {"written": stage5}})
    assert [r.get("pseudo_labels") for r in rows] == [
        None, None, {"written": stage2}, {"s": {"accuracy": 90.0}}, {"written": stage5}
    ]  # fmt: skip


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ciscr.mode=offline", "key 'ciscr.mode' must be one of"),
        ("ciscr.stage_epochs=[1,2]", "key 'ciscr.stage_epochs' must have 3 items"),
        ("ciscr.stage_epochs=[1,0,1]", "key 'ciscr.stage_epochs'"),
        ("ciscr.stage_lr=[0.1,0.1]", "key 'ciscr.stage_lr' must have 3 items"),
        ("ciscr.stage_lr=[0.1,0,0.1]", "key 'ciscr.stage_lr'"),
        (
            "ciscr.stage_epoch=[1,2,3]",
            "unknown config key 'ciscr.stage_epoch' (did you mean 'ciscr.stage_epochs'?)",
        ),
        ("ciscr.reliable_fraction=0", "key 'ciscr.reliable_fraction' must be > 0"),
        ("ciscr.min_area=0.1", "unknown config key 'ciscr.min_area'"),
    ],
)
def test_bad_ciscr_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert needle in str(err.value)


# ------------------------------------------------------------------------------ the staged pipeline
RUNNER = [sys.executable, "tests/run_ciscr.py"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny demo data without the unlabeled masks, and an uninterrupted staged run on it."""
    folder = tmp_path_factory.mktemp("ciscr")
    config, cfg = demo_data(str(folder))
    straight = folder / "straight"
    log = run([*RUNNER, "--config", config, "--save-path", str(straight)])
    return {"dir": folder, "config": config, "cfg": cfg, "straight": straight, "log": log}


def label_files(save):
    found = {}
    for stage in ("stage2", "stage5"):
        base = save / "pseudo_labels" / stage
        found.update({str(p.relative_to(save)): p.read_bytes() for p in sorted(base.rglob("*.png"))})
    return found


def stages_done(save) -> list[str]:
    return list(json.loads((save / "stages.json").read_text())["done"])


def labels_by(save, config, stage, images):
    """{image: the label map of `stage`'s best network}, by the pipeline's inference (scales and flips)."""
    from dataset.query import FullImages
    from util.metrics import predict

    cfg = load_config(config)
    model = build_model({**cfg, "pretrained": None})
    model.load_state_dict(weights(save / stage / "best.pth"))
    model.eval()
    c, out = cfg["ciscr"], {}
    for image, _, i in FullImages(cfg["data_root"], [(image, None) for image in images], cfg["nclass"]):
        with torch.no_grad():
            prob = predict(model, image[None], cfg["nclass"], scales=c["tta_scales"], flip=c["tta_flip"])
        out[images[i]] = prob.argmax(dim=1)[0].numpy()
    return out


def test_one_command_runs_every_stage(data):
    save = data["straight"]
    manifest = json.loads((save / "stages.json").read_text())
    assert list(manifest["done"]) == ["stage1", "stage2", "stage3", "stage4", "stage5", "stage6"]
    assert all(record["seconds"] > 0 for record in manifest["done"].values())
    reliable = (save / "selection" / "reliable.txt").read_text().split()
    unreliable = (save / "selection" / "unreliable.txt").read_text().split()
    assert len(reliable) == len(unreliable) == 9  # 18 unlabeled images, half reliable
    labels = label_files(save)
    assert len([p for p in labels if "stage2" in p]) == 18 and len([p for p in labels if "stage5" in p]) == 9
    # One epoch of each stage's own data (batch 2): stage 1 the 6 labeled images twice over (a list
    # shorter than 200), stage 4 the 9 reliable images, stage 6 all 18 unlabeled images.
    for stage, iterations in (("stage1", 6), ("stage4", 4), ("stage6", 9)):
        assert torch.load(save / stage / "latest.pth", weights_only=True)["iteration"] == iterations
    assert "the pseudo-labels' quality is not measured" in data["log"]  # their masks are missing
    assert manifest["done"]["stage2"]["quality"] is None
    best = torch.load(save / "best.pth", weights_only=True)
    assert best["miou"] == pytest.approx(manifest["done"]["stage6"]["best_miou"])
    # each retraining stage's frozen teacher: stage 4 learns from M1 (stage 1's best), stage 6 from M2
    for stage, teacher in (("stage4", "stage1"), ("stage6", "stage4")):
        frozen = torch.load(save / stage / "latest.pth", weights_only=True)["networks"]["teacher"]
        best = weights(save / teacher / "best.pth")
        assert all(torch.equal(frozen[k], best[k]) for k in best), f"{stage}'s teacher is not {teacher}'s"
    # the pseudo-labels: stage 2's are M1's of every image, stage 5's M2's of the unreliable ones
    m1 = labels_by(save, data["config"], "stage1", reliable + unreliable)
    m2 = labels_by(save, data["config"], "stage4", unreliable)
    for stage, predicted in (("stage2", m1), ("stage5", m2)):
        for image, label in predicted.items():
            written = np.array(Image.open(label_file(str(save / "pseudo_labels" / stage), image)))
            assert np.array_equal(written, label), f"{stage}: {image} was labelled by another network"
    differ = sum((m1[image] != m2[image]).mean() for image in unreliable) / len(unreliable)
    assert differ > 0.1, "M1 and M2 label alike: the test cannot tell which network labelled stage 5"

    # evals.jsonl: the stages' evaluations on one iteration count; the run scores with stage 6's network
    from tools.compare import Run, read_run

    records = [json.loads(line) for line in (save / "evals.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["iteration"]) for r in records] == [
        ("stage1", 3), ("stage1", 6), ("stage4", 9), ("stage4", 10), ("stage6", 13), ("stage6", 16),
        ("stage6", 19),
    ]  # fmt: skip
    assert all(r["total_iters"] == 19 and r["deploy"] == (r["stage"] == "stage6") for r in records)
    assert not any("pseudo_labels" in r for r in records)  # no masks, no quality: nothing to report
    run = read_run(Run("CISCR", 0, str(save)), None, 1)
    assert (run.status, run.iteration, run.final_iteration) == ("finished", 19, 19)
    assert run.best_miou == pytest.approx(manifest["done"]["stage6"]["best_miou"])


def start(args, log):
    """A process in the background, its output going to the file `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)


def reference_quality(save, stage, images, cfg):
    """(accuracy, mIoU) of `stage`'s pseudo-labels of `images` against their masks, pixel by pixel: the
    share of the masks' pixels labeled right, and the IoU averaged over the classes that occur."""
    masks = {image: mask for _, image, mask in read_split(cfg["unlabeled_id_path"], need_mask=True)}
    nclass, hits, labeled = cfg["nclass"], 0, 0
    intersection, union = [0] * nclass, [0] * nclass
    for image in images:
        label = np.array(Image.open(save / "pseudo_labels" / stage / (os.path.splitext(image)[0] + ".png")))
        mask = np.array(Image.open(os.path.join(cfg["data_root"], masks[image])))
        for p, t in zip(label.ravel().tolist(), mask.ravel().tolist()):
            if t == 255:
                continue
            labeled += 1
            hits += p == t
            intersection[t] += p == t
            for c in {p, t}:
                union[c] += 1
    ious = [i / u for i, u in zip(intersection, union) if u]
    return 100 * hits / labeled, 100 * sum(ious) / len(ious)


def test_stopped_or_killed_anywhere_the_same_command_ends_like_an_uninterrupted_run(data):
    """A stop signal at any moment (in a training stage's last evaluation, while pseudo-labelling, while
    ranking) ends the pipeline after that unit of work with exit status 75; a second signal while it exits
    changes nothing; a second run on the folder is refused while the first is up; SIGKILLs lose only
    unfinished work. The same command each time, and the run ends with every file of an uninterrupted one."""
    save, straight, cfg = data["dir"] / "stopped", data["straight"], data["cfg"]
    args = [*RUNNER, "--config", data["config"], "--save-path", str(save)]
    put_back_unlabeled_masks(data["dir"], cfg)  # now the pseudo-labels' quality is measured

    # SIGTERM in stage 1's last evaluation: stage 1 ends as usual, and the pipeline stops before stage 2.
    out = run([*args, "--signal-in-eval", "stage1", "TERM"], expect=EXIT_REQUEUE)
    assert "SIGTERM: stopping after the current step" in out and "stopped by SIGTERM before stage2" in out
    assert stages_done(save) == ["stage1"] and not (save / "pseudo_labels").exists()
    stage1_written = (save / "stage1" / "latest.pth").stat().st_mtime_ns

    # While it pseudo-labels, a second run on the folder is refused; SIGUSR1 then stops the first after
    # its chunk of 8 images.
    ready, log = data["dir"] / "ready", data["dir"] / "first.log"
    first = start([*args, "--wait-after-labels", "5", "--ready-file", str(ready)], log)
    wait_for(ready, first, log)
    out = run(args, expect=EXIT_BAD_INPUT)
    assert f"save path {save} is in use by another run (host {socket.gethostname()}, PID {first.pid}," in out
    first.send_signal(signal.SIGUSR1)
    assert first.wait(timeout=600) == EXIT_REQUEUE, log.read_text()
    assert "stopped by SIGUSR1 in stage2 with 8 of 18 pseudo-labels written" in log.read_text()
    assert stages_done(save) == ["stage1"] and len(label_files(save)) == 8

    # SIGKILL after 3 more labels (a chunk half written), then Ctrl-C while ranking and a SIGTERM while it
    # exits: the chunk is labeled again, stage 3 starts over.
    run([*args, "--signal-after-labels", "3", "KILL"], expect=-9)
    assert len(label_files(save)) == 11
    out = run([*args, "--signal-in-ranking", "INT", "--signal-after-stop", "TERM"], expect=EXIT_REQUEUE)
    assert "stopped by SIGINT in stage3" in out and "SIGTERM again: ignored" in out
    assert "KeyboardInterrupt" not in out and "Traceback" not in out
    assert stages_done(save) == ["stage1", "stage2"] and not (save / "selection").exists()

    # Killed inside the last stage, before its iteration 3 (after the evaluation and save at 3).
    run([*args, "--kill-in", "stage6", "--kill-at", "3"], expect=-9)
    assert (save / "stage1" / "latest.pth").stat().st_mtime_ns == stage1_written, "stage 1 was redone"
    assert torch.load(save / "stage6" / "latest.pth", weights_only=True)["iteration"] == 3
    log = run(args)
    assert "stages to run: stage6" in log and "at iteration 3/9" in log

    assert label_files(save) == label_files(straight)
    for name in ("reliable.txt", "unreliable.txt", "query_lists.json"):
        assert (save / "selection" / name).read_bytes() == (straight / "selection" / name).read_bytes()
    for stage in ("stage1", "stage4", "stage6"):
        a, b = weights(save / stage / "latest.pth"), weights(straight / stage / "latest.pth")
        assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: resumed weights differ"

    # The pseudo-labels' quality against the masks the unlabeled split lists, measured as they were made.
    done = json.loads((save / "stages.json").read_text())["done"]
    reliable = (save / "selection" / "reliable.txt").read_text().split()
    unreliable = (save / "selection" / "unreliable.txt").read_text().split()
    measured = [
        (done["stage2"]["quality"], "stage2", reliable + unreliable),
        (done["stage3"]["quality"]["reliable"], "stage2", reliable),
        (done["stage3"]["quality"]["unreliable"], "stage2", unreliable),
        (done["stage5"]["quality"], "stage5", unreliable),
    ]
    for quality, stage, images in measured:
        accuracy, miou = reference_quality(save, stage, images, cfg)
        assert (quality["images"], quality["used"]) == (len(images), 100.0)
        assert quality["accuracy"] == pytest.approx(accuracy) and quality["miou"] == pytest.approx(miou)


def test_two_processes_stop_together_and_run_every_stage_with_identical_ranks(data):
    """Under torchrun a stop signal to one rank while pseudo-labelling stops both where they meet (the
    other finishes its share first); the same command then runs every stage with identical ranks."""
    save, dump = data["dir"] / "ddp", data["dir"] / "dump"
    relative = os.path.relpath(save, ROOT)  # relative to the working folder, not to the data root
    command = [*TORCHRUN, *RUNNER[1:], "--config", data["config"], "--save-path", relative,
               "--dump-weights", str(dump)]  # fmt: skip
    out = run([*command, "--signal-after-labels", "2", "USR1", "--signal-rank", "1"], expect=1)
    assert "rank 1: SIGUSR1: stopping after the current step" in out
    assert "stopped by a signal to another rank in stage2 with 17 of 18 pseudo-labels written" in out
    assert out.count("exitcode  : 75") == 2  # torchrun's report of each worker
    assert stages_done(save) == ["stage1"]

    run(command)
    assert len(label_files(save)) == 18 + 9  # the two ranks' shares make up every image
    for stage in ("stage1", "stage4", "stage6"):
        r0, r1 = (torch.load(dump / f"{stage}_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{stage}: ranks diverged"
        saved = weights(save / stage / "latest.pth")
        assert all(torch.equal(r0[k], saved[k]) for k in saved)


def test_online_variant_under_two_processes(data):
    """ciscr.mode=online: UniMatch's loop with an EMA teacher; ranks stay identical, one update per step."""
    save, dump = data["dir"] / "online", data["dir"] / "online_dump"
    run([*TORCHRUN, "tests/run_training.py", "CISCR", "--config", data["config"], "--save-path", str(save),
         "--dump-weights", str(dump), "ciscr.mode=online", "conf_thresh=0", "max_iters=4"])  # fmt: skip
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0 if "extra" not in k)
    state = torch.load(save / "latest.pth", weights_only=True)
    # one EMA update per step (the formula itself: test_online_teacher_is_an_eval_mode_ema_...)
    assert state["networks"]["teacher"]["_extra_state"]["updates"] == 4
