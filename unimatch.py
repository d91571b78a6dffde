"""UniMatch (Yang et al., CVPR 2023): weak-to-strong consistency with image-level perturbation on two
CutMixed strong views and feature-level perturbation (channel dropout) on the weak view.

    torchrun --nproc_per_node=4 unimatch.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/unimatch_366
"""

import torch

from util.engine import Method, main
from util.losses import confident_cross_entropy


def cutmix(image: torch.Tensor, image_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste `image_mix` into `image` where the box (B, H, W) is 1; on the device, no copies per image."""
    box = box.bool()
    return torch.where(box.unsqueeze(1) if image.dim() == 4 else box, image_mix, image)


class UniMatch(Method):
    """UniMatch: labeled CE + confident CE on CutMixed strong views and on the feature-perturbed weak view."""

    need_feature = False  # methods built on this step (UCCL, MLCL) ask for the decoder features

    def predict(self, batch: dict) -> dict:
        """The forward passes of one UniMatch step and the pseudo-labels they give (spec section 0.4).

        Returns a dict of tensors that the losses below, and those of methods built on UniMatch, read.
        """
        img_x, mask_x = batch["labeled"]
        img_u_w, img_u_s1, img_u_s2, ignore_mask, cutmix_box1, cutmix_box2 = batch["unlabeled"]
        img_u_w_mix, img_u_s1_mix, img_u_s2_mix, ignore_mask_mix, _, _ = batch["mix"]
        model = self.model

        # Pseudo-labels for the pasted regions come from an eval-mode forward of the mix images.
        with torch.no_grad():
            model.eval()
            pred_u_w_mix = model(img_u_w_mix).detach()
            conf_u_w_mix, mask_u_w_mix = pred_u_w_mix.softmax(dim=1).max(dim=1)
        model.train()

        img_u_s1 = cutmix(img_u_s1, img_u_s1_mix, cutmix_box1)
        img_u_s2 = cutmix(img_u_s2, img_u_s2_mix, cutmix_box2)

        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        out = model(torch.cat((img_x, img_u_w)), need_fp=True, need_feature=self.need_feature)
        preds, preds_fp = (out["logits"], out["logits_fp"]) if self.need_feature else out
        pred_x, pred_u_w = preds.split([num_lb, num_ulb])
        pred_u_w_fp = preds_fp[num_lb:]

        out_s = model(torch.cat((img_u_s1, img_u_s2)), need_feature=self.need_feature)
        preds_s = out_s["logits"] if self.need_feature else out_s
        pred_u_s1, pred_u_s2 = preds_s.chunk(2)

        # Pseudo-labels of the weak view come from the same train-mode forward, without gradient.
        pred_u_w = pred_u_w.detach()
        conf_u_w, mask_u_w = pred_u_w.softmax(dim=1).max(dim=1)

        # Targets of the strong views: the weak pseudo-label, with the pasted box taken from the mix image.
        mask_u_w_cutmixed1 = cutmix(mask_u_w, mask_u_w_mix, cutmix_box1)
        conf_u_w_cutmixed1 = cutmix(conf_u_w, conf_u_w_mix, cutmix_box1)
        ignore_mask_cutmixed1 = cutmix(ignore_mask, ignore_mask_mix, cutmix_box1)
        mask_u_w_cutmixed2 = cutmix(mask_u_w, mask_u_w_mix, cutmix_box2)
        conf_u_w_cutmixed2 = cutmix(conf_u_w, conf_u_w_mix, cutmix_box2)
        ignore_mask_cutmixed2 = cutmix(ignore_mask, ignore_mask_mix, cutmix_box2)

        result = dict(
            pred_x=pred_x, mask_x=mask_x,
            pred_u_w=pred_u_w, conf_u_w=conf_u_w, mask_u_w=mask_u_w, ignore_mask=ignore_mask,
            pred_u_w_fp=pred_u_w_fp,
            pred_u_s1=pred_u_s1, mask_u_w_cutmixed1=mask_u_w_cutmixed1,
            conf_u_w_cutmixed1=conf_u_w_cutmixed1, ignore_mask_cutmixed1=ignore_mask_cutmixed1,
            pred_u_s2=pred_u_s2, mask_u_w_cutmixed2=mask_u_w_cutmixed2,
            conf_u_w_cutmixed2=conf_u_w_cutmixed2, ignore_mask_cutmixed2=ignore_mask_cutmixed2,
        )  # fmt: skip
        if self.need_feature:
            # Decoder features (B, C, h, w) of the weak view (clean half) and of the two strong views.
            result["feat_u_w"] = out["feature"][num_lb:]
            result["feat_u_s1"], result["feat_u_s2"] = out_s["feature"].chunk(2)
            result["logits_low_u_w"] = out["logits_low"][num_lb:]
            result["logits_low_u_s1"], result["logits_low_u_s2"] = out_s["logits_low"].chunk(2)
        return result

    def unimatch_losses(self, p: dict) -> tuple[dict, dict]:
        """L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, returned as its weighted terms."""
        thresh = self.cfg["conf_thresh"]
        loss_x = self.criterion_l(p["pred_x"], p["mask_x"])
        loss_u_s1 = confident_cross_entropy(
            p["pred_u_s1"],
            p["mask_u_w_cutmixed1"],
            p["conf_u_w_cutmixed1"],
            p["ignore_mask_cutmixed1"],
            thresh,
        )
        loss_u_s2 = confident_cross_entropy(
            p["pred_u_s2"],
            p["mask_u_w_cutmixed2"],
            p["conf_u_w_cutmixed2"],
            p["ignore_mask_cutmixed2"],
            thresh,
        )
        loss_u_w_fp = confident_cross_entropy(
            p["pred_u_w_fp"], p["mask_u_w"], p["conf_u_w"], p["ignore_mask"], thresh
        )
        losses = {
            "x": loss_x / 2,
            "s1": loss_u_s1 * 0.25 / 2,
            "s2": loss_u_s2 * 0.25 / 2,
            "fp": loss_u_w_fp * 0.5 / 2,
        }

        valid = p["ignore_mask"] != 255
        mask_ratio = ((p["conf_u_w"] >= thresh) & valid).sum() / valid.sum().clamp(min=1)
        return losses, {"mask_ratio": float(mask_ratio)}

    def step(self, batch: dict) -> tuple[dict, dict]:
        return self.unimatch_losses(self.predict(batch))


METHOD = UniMatch

if __name__ == "__main__":
    main(UniMatch)
