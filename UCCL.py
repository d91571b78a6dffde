"""UCCL (Yin et al., ICASSP 2025): uncertainty-participation context consistency learning, on UniMatch.

UniMatch's step plus two terms on each CutMixed strong view k and the weak view of the same content:
SBU trains the strong prediction on uncertain pixels, weighted by weak/strong feature similarity; CKR
aligns class-region features of the two views. Paper by default; `uccl.*` switches give the released
code (docs/DIFFERENCES.md).

    torchrun --nproc_per_node=4 UCCL.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/uccl_366
"""

import torch

from unimatch import Prediction, UniMatch, View, cutmix, resize_feature, sample_to_grid
from util.engine import main
from util.losses import IGNORE
from util.losses.uccl import ckr_loss, sbu_loss


class UCCL(UniMatch):
    """UniMatch + SBU (semantic backpropagation update) + CKR (class-aware knowledge regulation)."""

    def step(self, batch: dict) -> tuple[dict, dict]:
        cfg = self.cfg["uccl"]
        p = self.predict(batch)
        losses, stats = self.unimatch_losses(p)

        sbu_released, ckr_released = cfg["sbu"] == "released", cfg["ckr"] == "released"
        # the released code takes the uncertainty threshold from conf_thresh (0 on Cityscapes: SBU is off)
        thresh = self.cfg["conf_thresh"] if sbu_released else cfg["uncertain_thresh"]
        sign = 1.0 if cfg["similarity"] == "positive" else -1.0
        loss_sbu, loss_ckr = [], []
        for strong in p.strong_views:
            # both views of the same content on the stride-4 grid: features F_w, F_s and logits z_w, z_s
            grid = tuple(strong.logits_low.shape[-2:])
            feat_weak, logits_weak = self.weak_view_of(batch, p, strong, grid)
            feat_strong = resize_feature(strong.feature(cfg["feature"]), grid)
            valid = sample_to_grid(strong.ignore_mask, grid) != IGNORE
            loss_sbu.append(
                sbu_loss(
                    feat_weak, feat_strong, logits_weak, strong.logits_low, valid, thresh, sign, sbu_released
                )
            )
            loss_ckr.append(ckr_loss(feat_weak, feat_strong, logits_weak, valid, ckr_released))

        losses["sbu"] = cfg["sbu_weight"] * sum(loss_sbu) / len(loss_sbu)
        losses["ckr"] = cfg["ckr_weight"] * sum(loss_ckr) / len(loss_ckr)
        return losses, stats

    def weak_view_of(
        self, batch: dict, p: Prediction, strong: View, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature (B, C, h, w) and low-resolution logits (B, K, h, w) of the weak view of strong view
        `strong`'s content, on the stride-4 grid."""
        level = self.cfg["uccl"]["feature"]
        if self.cfg["uccl"]["weak_view"] == "pasted":
            # u_w with the box pasted from the mix image, taken from the forwards UniMatch already ran
            return p.weak_cutmixed(strong, level, grid), p.weak_cutmixed(strong, "logits_low")
        # released: one more train-mode forward of the CutMixed weak image
        img_u_w, img_u_w_mix = batch["unlabeled"][0], batch["mix"][0]
        out = self.model(cutmix(img_u_w, img_u_w_mix, strong.cutmix_box), features=True)
        return resize_feature(out.feature(level), grid), out.logits_low


METHOD = UCCL

if __name__ == "__main__":
    main(UCCL)
