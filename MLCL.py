"""MLCL / MCCL (Yin et al., "Multi-Level" / "Multi-Constraint Consistency Learning", IEEE TMM 2025):
UniMatch's step plus feature knowledge alignment (FKA) and self-adaptive intervention (SAI).

    torchrun --nproc_per_node=4 MLCL.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/mlcl_366

The paper's method is the default; the `mlcl:` config section has a switch for every place where the
released code differs (docs/DIFFERENCES.md). Everything comes from UniMatch's forward passes: the weak
view of each CutMixed strong view is pasted from the weak and the mix outputs, with no forward of its own.
"""

import torch

from unimatch import UniMatch, cutmix, resize_feature, sample_to_grid
from util.engine import main
from util.losses.mlcl import (
    PrototypeMemory,
    feature_masking,
    fka_prototype_loss,
    noise_injection,
    per_image_similarity,
    pixels,
    point_to_point_loss,
    sai_strength,
    sai_weight,
    softmax_mse,
)

# 'encoder' = ASPP output (stride 16), 'decoder' = decoder feature F (stride 4): names in UniMatch.predict
LEVELS = {"encoder": "enc", "decoder": "feat"}


class MLCL(UniMatch):
    """MLCL: UniMatch + point-to-point and prototype feature alignment + adaptive noise and masking."""

    need_feature = True

    def __init__(self, cfg, criterion_l, device):
        super().__init__(cfg, criterion_l, device)
        self.mcfg = cfg["mlcl"]
        # One prototype per class of the dataset, in the head's feature width (encoder and decoder alike).
        self.prototypes = PrototypeMemory(cfg["nclass"], cfg["head_channels"], device)

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
    def _view(self, p: dict, level: str, k: int) -> tuple:
        """Weak (detached) and strong features of strong view k's content, and the weak pseudo-label,
        its confidence and the not-padding mask sampled at their grid."""
        strong = p[f"{level}_u_s{k}"]
        weak = self.weak_cutmixed(p, level, k).detach()
        grid = tuple(strong.shape[-2:])
        labels = sample_to_grid(p[f"mask_u_w_cutmixed{k}"], grid)
        confidence = sample_to_grid(p[f"conf_u_w_cutmixed{k}"], grid)
        valid = sample_to_grid(p[f"ignore_mask_cutmixed{k}"], grid) != 255
        return weak, strong, labels, confidence, valid

    def fka_losses(self, p: dict) -> tuple[dict, dict]:
        """Point-to-point alignment and prototype compactness, averaged over the two strong views; then
        the prototype memory takes its EMA step from the confident weak-view features."""
        c = self.mcfg
        level = LEVELS[c["fka_feature"]]
        losses, stats = {}, {}
        if c["p2p_weight"] == 0 and c["proto_weight"] == 0:
            return losses, stats
        views = [self._view(p, level, k) for k in (1, 2)]
        if c["p2p_weight"] > 0:
            p2p = sum(point_to_point_loss(w, s, v) for w, s, _, _, v in views) / 2
            losses["p2p"] = c["p2p_weight"] * p2p
        if c["proto_weight"] > 0:
            memory, initialised = self.prototypes.memory, self.prototypes.initialised
            terms = [
                fka_prototype_loss(
                    pixels(weak), pixels(strong), labels.flatten(), conf.flatten(), valid.flatten(),
                    memory, initialised, c["num_anchors"], c["num_strong"], c["anchor_thresh"],
                    c["proto_pairing"], c["anchor_selection"], c["proto_denominator"],
                )
                for weak, strong, labels, conf, valid in views
            ]  # fmt: skip
            losses["proto"] = c["proto_weight"] * (terms[0][0] + terms[1][0]) / 2
            stats["proto_classes"] = float(terms[0][1] + terms[1][1]) / 2
            # The memory follows the weak view u_w (train-mode features, as released), after the loss.
            weak = p[f"{level}_u_w"]
            grid = tuple(weak.shape[-2:])
            confident = (sample_to_grid(p["conf_u_w"], grid) > c["anchor_thresh"]) & (
                sample_to_grid(p["ignore_mask"], grid) != 255
            )
            self.prototypes.update(
                pixels(weak),
                sample_to_grid(p["mask_u_w"], grid).flatten(),
                confident.flatten(),
                c["momentum"],
                released=c["ema_update"] == "released",
            )
        return losses, stats

    # ----------------------------------------------------------------------------------------- SAI
    def sai_losses(self, p: dict) -> tuple[dict, dict]:
        """Noise injection and masking of both strong views' features, with a strength per image from
        the weak/strong similarity, decoded in one batch and held to the soft CutMixed weak prediction.

        Random draws (global torch RNG, on the device): noise U(0, 1) of the features' shape (2B, C, h, w),
        then masking U(0, 1) of shape (2B,).
        """
        c = self.mcfg
        weight = sai_weight(c["sai_weight"], self.iteration, self.total_iters)
        if not (c["sai_noise"] or c["sai_mask"]) or weight == 0 or self.iteration < c["sai_warm_up"]:
            return {}, {}
        level = LEVELS[c["sai_feature"]]
        strong = torch.cat([p[f"{level}_u_s1"], p[f"{level}_u_s2"]])
        weak = torch.cat([self.weak_cutmixed(p, level, 1), self.weak_cutmixed(p, level, 2)])
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
        if level == "enc":  # the paper: perturbed encoder output through the decoder
            low_level = torch.cat([p["low_level_u_s1"], p["low_level_u_s2"]])
            feature = self.net.decode(low_level.repeat(len(names), 1, 1, 1), feature)
        size = tuple(p["pred_u_w"].shape[-2:])
        logits = resize_feature(self.net.classify(feature), size)

        # Targets: the soft weak prediction of each strong view's content (the box from the mix image).
        prob_w = p["pred_u_w"].float().softmax(dim=1)
        prob_mix = resize_feature(p["logits_low_u_w_mix"].float(), size).softmax(dim=1)
        target = torch.cat(
            [cutmix(prob_w, prob_mix, p["cutmix_box1"]), cutmix(prob_w, prob_mix, p["cutmix_box2"])]
        )
        losses = {
            name: weight * softmax_mse(part, target)
            for name, part in zip(names, logits.chunk(len(names)))
        }  # fmt: skip
        return losses, {"sai_similarity": float(similarity.mean()), "sai_w": weight}

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "prototypes" not in state:
            raise ValueError(f"MLCL needs its prototype memory, but the checkpoint has {sorted(state)}")
        self.prototypes.load_state_dict(state["prototypes"])


METHOD = MLCL

if __name__ == "__main__":
    main(MLCL)
