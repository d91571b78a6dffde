"""UCCL (Yin et al., ICASSP 2025): uncertainty-participation context consistency learning, on UniMatch.

UniMatch's step plus two terms on each CutMixed strong view k and the weak view of the same content:
SBU trains the strong prediction on uncertain pixels, weighted by weak/strong feature similarity; CKR
aligns class-region features of the two views. Paper by default; `uccl.*` switches give the released
code (docs/DIFFERENCES.md).

    torchrun --nproc_per_node=4 UCCL.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/uccl_366
"""

from unimatch import UniMatch, cutmix, resize_feature, sample_to_grid
from util.engine import main
from util.losses.uccl import ckr_loss, sbu_loss


class UCCL(UniMatch):
    """UniMatch + SBU (semantic backpropagation update) + CKR (class-aware knowledge regulation)."""

    need_feature = True

    def weak_and_strong_views(self, batch: dict, p: dict, k: int) -> tuple:
        """Features and low-resolution logits of strong view k and of the weak view of its content, on the
        stride-4 grid: (feat_weak, logits_weak, feat_strong, logits_strong)."""
        cfg = self.cfg["uccl"]
        name = "enc" if cfg["feature"] == "encoder" else "feat"
        logits_strong = p[f"logits_low_u_s{k}"]
        size = tuple(logits_strong.shape[-2:])
        feat_strong = resize_feature(p[f"{name}_u_s{k}"], size)
        if cfg["weak_view"] == "pasted":
            # u_w with the box pasted from the mix image, taken from the forwards UniMatch already ran
            feat_weak = self.weak_cutmixed(p, name, k, size)
            logits_weak = self.weak_cutmixed(p, "logits_low", k)
        else:
            # released: one more train-mode forward of the CutMixed weak image
            img_u_w, img_u_w_mix = batch["unlabeled"][0], batch["mix"][0]
            out = self.model(cutmix(img_u_w, img_u_w_mix, p[f"cutmix_box{k}"]), need_feature=True)
            feat_weak = resize_feature(out["encoder_feature" if name == "enc" else "feature"], size)
            logits_weak = out["logits_low"]
        return feat_weak, logits_weak, feat_strong, logits_strong

    def step(self, batch: dict) -> tuple[dict, dict]:
        cfg = self.cfg["uccl"]
        p = self.predict(batch)
        losses, stats = self.unimatch_losses(p)

        sbu_released, ckr_released = cfg["sbu"] == "released", cfg["ckr"] == "released"
        # the released code takes the uncertainty threshold from conf_thresh (0 on Cityscapes: SBU is off)
        thresh = self.cfg["conf_thresh"] if sbu_released else cfg["uncertain_thresh"]
        sign = 1.0 if cfg["similarity"] == "positive" else -1.0
        loss_sbu, loss_ckr = [], []
        for k in (1, 2):
            feat_weak, logits_weak, feat_strong, logits_strong = self.weak_and_strong_views(batch, p, k)
            valid = sample_to_grid(p[f"ignore_mask_cutmixed{k}"], tuple(logits_strong.shape[-2:])) != 255
            loss_sbu.append(
                sbu_loss(
                    feat_weak, feat_strong, logits_weak, logits_strong, valid, thresh, sign, sbu_released
                )
            )
            loss_ckr.append(ckr_loss(feat_weak, feat_strong, logits_weak, valid, ckr_released))

        losses["sbu"] = cfg["sbu_weight"] * (loss_sbu[0] + loss_sbu[1]) / 2
        losses["ckr"] = cfg["ckr_weight"] * (loss_ckr[0] + loss_ckr[1]) / 2
        return losses, stats


METHOD = UCCL

if __name__ == "__main__":
    main(UCCL)
