"""UniMatch (Yang et al., CVPR 2023): weak-to-strong consistency with image-level perturbation on two
CutMixed strong views and feature-level perturbation (channel dropout) on the weak view.

    torchrun --nproc_per_node=4 unimatch.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/unimatch_366
"""

import torch
import torch.nn.functional as F

from util.engine import Method, main
from util.losses import confident_cross_entropy


def cutmix(image: torch.Tensor, image_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste `image_mix` into `image` where the box (B, H, W) is 1; on the device, no copies per image."""
    box = box.bool()
    return torch.where(box.unsqueeze(1) if image.dim() == 4 else box, image_mix, image)


def sample_to_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sample a full-resolution map (B, H, W) at the pixels a feature grid (h, w) sits on.

    The feature pixel i of a stride-4 map looks at input pixel round(i * (H - 1) / (h - 1)), the
    align_corners=True convention used for every resize in the model; for H = 4h - 3 (321, 513, 801) this
    is exactly mask[:, ::4, ::4]. Nearest sampling keeps labels and the ignore value 255 intact.
    """
    height, width = mask.shape[-2:]
    rows = torch.linspace(0, height - 1, size[0], device=mask.device).round().long()
    cols = torch.linspace(0, width - 1, size[1], device=mask.device).round().long()
    return mask[..., rows[:, None], cols[None, :]]


def resize_feature(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=True, as in the decoder); a no-op when the size already matches."""
    if feature.shape[-2:] == torch.Size(size):
        return feature
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=True)


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
            out_mix = model(img_u_w_mix, need_feature=self.need_feature)
            pred_u_w_mix = out_mix["logits"] if self.need_feature else out_mix
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
            # Features of the weak view (clean half of the FP pass, with gradient), of the mix image (eval
            # mode, no gradient) and of the two CutMixed strong views: 'feat' is the decoder feature
            # (B, C, h, w) at stride 4, 'enc' the encoder output (ASPP) at stride 16, 'logits_low' the
            # classifier output at stride 4 (B, K, h, w), 'low_level' the backbone's stride-4 feature that
            # `decode(low_level, enc)` needs to re-run the decoder from a perturbed encoder output.
            names = ("feat", "enc", "logits_low", "low_level")
            keys = ("feature", "encoder_feature", "logits_low", "low_level")
            for name, key in zip(names, keys):
                result[f"{name}_u_w"] = out[key][num_lb:]
                result[f"{name}_u_w_mix"] = out_mix[key]
                result[f"{name}_u_s1"], result[f"{name}_u_s2"] = out_s[key].chunk(2)
            result["cutmix_box1"], result["cutmix_box2"] = cutmix_box1, cutmix_box2
        return result

    @staticmethod
    def weak_cutmixed(p: dict, name: str, k: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The weak view of the content of strong view k, from `p[name + '_u_w']` and `p[name + '_u_w_mix']`
        resized to `size` (default: their own resolution).

        Strong view k is u_s_k with its box pasted from the mix image; its pixel-aligned weak counterpart
        is u_w with the same box pasted from the mix image. Pasting the two weak forwards' outputs gives it
        without a forward pass of its own (as UniMatch builds the strong views' pseudo-labels). The weak
        half carries its gradient; the mix half, from the no-grad eval forward, has none.
        """
        weak, mix = p[f"{name}_u_w"], p[f"{name}_u_w_mix"]
        size = tuple(weak.shape[-2:]) if size is None else tuple(size)
        box = sample_to_grid(p[f"cutmix_box{k}"], size)
        return cutmix(resize_feature(weak, size), resize_feature(mix, size), box)

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
