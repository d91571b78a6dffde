"""MLCL / MCCL (Yin et al., "Multi-Level" / "Multi-Constraint Consistency Learning", IEEE TMM 2025):
UniMatch's step plus feature knowledge alignment (FKA) and self-adaptive intervention (SAI).

    torchrun --nproc_per_node=4 MLCL.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/mlcl_366

The paper's method is the default; the `mlcl:` config section has a switch for every place where the
released code differs (docs/DIFFERENCES.md). Everything comes from UniMatch's forward passes: the weak
view of each CutMixed strong view is pasted from the weak and the mix outputs, with no forward of its own.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from model.semseg.deeplabv3plus import running_stats_frozen
from unimatch import Prediction, UniMatch, View, cutmix, resize_feature, sample_to_grid
from util.engine import main
from util.losses import IGNORE
from util.losses.mlcl import (
    PrototypeMemory,
    feature_masking,
    fka_prototype_loss,
    noise_injection,
    per_image_similarity,
    point_to_point_loss,
    sai_strength,
    sai_weight,
    softmax_mse,
)
from util.losses.pixels import pixels


class MLCL(UniMatch):
    """MLCL: UniMatch + point-to-point and prototype feature alignment + adaptive noise and masking."""

    def __init__(self, cfg, criterion_l, device):
        super().__init__(cfg, criterion_l, device)
        self.prototypes = new_prototype_memory(cfg, device)

    @property
    def net(self):
        """The model without its DDP wrapper, for the decoder/classifier entry points."""
        return self.unwrapped("model")

    def step(self, batch: dict) -> tuple[dict, dict]:
        p = self.predict(batch)
        losses, stats = self.unimatch_losses(p)
        fka_losses, fka_stats = self.fka_losses(p)
        sai_losses, sai_stats = self.sai_losses(p)
        return {**losses, **fka_losses, **sai_losses}, {**stats, **fka_stats, **sai_stats}

    # ----------------------------------------------------------------------------------------- FKA
    def fka_losses(self, p: Prediction) -> tuple[dict, dict]:
        """Point-to-point alignment and prototype compactness, averaged over the two strong views; then
        the prototype memory takes its EMA step from the confident weak-view features."""
        c = self.cfg["mlcl"]
        level = c["fka_feature"]
        losses, stats = {}, {}
        if c["p2p_weight"] == 0 and c["proto_weight"] == 0:
            return losses, stats
        pairs = [aligned_pair(p, view, level) for view in p.strong_views]
        if c["p2p_weight"] > 0:
            p2p = sum(point_to_point_loss(pair.weak, pair.strong, pair.valid) for pair in pairs) / 2
            losses["p2p"] = c["p2p_weight"] * p2p
        if c["proto_weight"] > 0:
            memory, initialised = self.prototypes.memory, self.prototypes.initialised
            terms = [
                fka_prototype_loss(
                    pixels(pair.weak), pixels(pair.strong), pair.labels.flatten(), pair.confidence.flatten(),
                    pair.valid.flatten(), memory, initialised, c["num_anchors"], c["num_strong"],
                    c["anchor_thresh"], c["proto_pairing"], c["anchor_selection"], c["proto_denominator"],
                )
                for pair in pairs
            ]  # fmt: skip
            losses["proto"] = c["proto_weight"] * (terms[0][0] + terms[1][0]) / 2
            stats["proto_classes"] = (terms[0][1] + terms[1][1]) / 2
            # The memory follows the weak view u_w (train-mode features, as released), after the loss.
            weak = p.weak.feature(level)
            grid = tuple(weak.shape[-2:])
            confident = (sample_to_grid(p.weak.confidence, grid) > c["anchor_thresh"]) & (
                sample_to_grid(p.weak.ignore_mask, grid) != IGNORE
            )
            self.prototypes.update(
                pixels(weak),
                sample_to_grid(p.weak.pseudo_label, grid).flatten(),
                confident.flatten(),
                c["momentum"],
                released=c["ema_update"] == "released",
            )
        return losses, stats

    # ----------------------------------------------------------------------------------------- SAI
    def sai_losses(self, p: Prediction) -> tuple[dict, dict]:
        """Noise injection and masking of both strong views' features, with a strength per image from
        the weak/strong similarity, decoded in one batch and held to the soft CutMixed weak prediction.

        Random draws (global torch RNG, on the device): noise U(0, 1) of the features' shape (2B, C, h, w),
        then masking U(0, 1) of shape (2B,).
        """
        c = self.cfg["mlcl"]
        weight = sai_weight(c["sai_weight"], self.iteration, self.total_iters)
        if not (c["sai_noise"] or c["sai_mask"]) or weight == 0 or self.iteration < c["sai_warm_up"]:
            return {}, {}
        level = c["sai_feature"]
        strong = torch.cat([view.feature(level) for view in p.strong_views])
        weak = torch.cat([p.weak_cutmixed(view, level) for view in p.strong_views])
        similarity = per_image_similarity(weak, strong)  # (2B,), no gradient
        strength = sai_strength(similarity)

        perturbed, names = [], []
        if c["sai_noise"]:
            uniform = torch.rand(strong.shape, device=strong.device)
            perturbed.append(noise_injection(strong, strength, uniform))
            names.append("noise")
        if c["sai_mask"]:
            mask_strength = strength
            if c["sai_strength"] == "released" and c["sai_noise"]:
                mask_strength = sai_strength(strength)  # the released in-place rescaling, applied again
            uniform = torch.rand(strong.shape[0], device=strong.device)
            perturbed.append(feature_masking(strong, mask_strength, uniform))
            names.append("mask")
        feature = torch.cat(perturbed)
        if level == "encoder":  # the paper: perturbed encoder output through the decoder
            low_level = torch.cat([view.low_level for view in p.strong_views])
            # The decoder's BN normalises the perturbed batch by its own statistics; its running
            # statistics (used at evaluation and for the mix pseudo-labels) follow the real images only,
            # unless sai_bn_update asks for the perturbed copies to count too.
            frozen = nullcontext() if c["sai_bn_update"] else running_stats_frozen(self.net)
            with frozen:
                feature = self.net.decode(low_level.repeat(len(names), 1, 1, 1), feature)
        size = tuple(p.weak.logits.shape[-2:])
        logits = resize_feature(self.net.classify(feature), size)

        # Targets: the soft weak prediction of each strong view's content (the box from the mix image).
        prob_w = p.weak.logits.float().softmax(dim=1)
        prob_mix = resize_feature(p.mix.logits_low.float(), size).softmax(dim=1)
        target = torch.cat([cutmix(prob_w, prob_mix, view.cutmix_box) for view in p.strong_views])
        losses = {
            name: weight * softmax_mse(part, target)
            for name, part in zip(names, logits.chunk(len(names)))
        }  # fmt: skip
        stats = {"sai_similarity": similarity.mean(), "sai_w": torch.full((), weight, device=strong.device)}
        return losses, stats

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "prototypes" not in state:
            raise ValueError(f"MLCL needs its prototype memory, but the checkpoint has {sorted(state)}")
        self.prototypes.load_state_dict(state["prototypes"])


def new_prototype_memory(cfg: dict, device: torch.device) -> PrototypeMemory:
    """One prototype per class of the dataset, in the head's feature width (encoder and decoder alike)."""
    return PrototypeMemory(cfg["nclass"], cfg["head_channels"], device)


@dataclass
class AlignedPair:
    """Weak (detached) and strong features (B, C, h, w) of one strong view's content, with the weak
    pseudo-label, its confidence and the not-padding mask (B, h, w) sampled at their grid."""

    weak: torch.Tensor
    strong: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor
    valid: torch.Tensor


def aligned_pair(p: Prediction, view: View, level: str) -> AlignedPair:
    strong = view.feature(level)
    grid = tuple(strong.shape[-2:])
    return AlignedPair(
        weak=p.weak_cutmixed(view, level).detach(),
        strong=strong,
        labels=sample_to_grid(view.pseudo_label, grid),
        confidence=sample_to_grid(view.confidence, grid),
        valid=sample_to_grid(view.ignore_mask, grid) != IGNORE,
    )


METHOD = MLCL

if __name__ == "__main__":
    main(MLCL)
