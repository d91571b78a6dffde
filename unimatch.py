"""UniMatch (Yang et al., CVPR 2023): weak-to-strong consistency with image-level perturbation on two
CutMixed strong views and feature-level perturbation (channel dropout) on the weak view.

    torchrun --nproc_per_node=4 unimatch.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/unimatch_366
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.semseg.deeplabv3plus import SegmentationOutput
from util.engine import Method, main
from util.losses import IGNORE, confident_cross_entropy
from util.losses.pixels import sample_to_grid


def cutmix(image: torch.Tensor, image_mix: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste `image_mix` into `image` where the box (B, H, W) is 1; on the device, no copies per image."""
    box = box.bool()
    return torch.where(box.unsqueeze(1) if image.dim() == 4 else box, image_mix, image)


def resize_feature(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=True, as in the decoder); a no-op when the size already matches."""
    if feature.shape[-2:] == torch.Size(size):
        return feature
    return F.interpolate(feature, size=size, mode="bilinear", align_corners=True)


@dataclass(kw_only=True)
class View(SegmentationOutput):
    """One unlabeled view of a UniMatch step: the model's maps of it (see SegmentationOutput) and the
    targets its losses read, at full resolution (B, H, W).

    pseudo_label  long, the class the view is trained towards
    confidence    float, the max softmax probability that pseudo-label came with
    ignore_mask   IGNORE (255) on crop padding
    cutmix_box    1 where the view shows the mix image (strong views); None for the weak and mix views
    truth         the images' own masks, mixed like the view, to measure its pseudo-label (never a loss's
                  input); None when the unlabeled split has no masks
    """

    pseudo_label: torch.Tensor
    confidence: torch.Tensor
    ignore_mask: torch.Tensor
    cutmix_box: torch.Tensor | None = None
    truth: torch.Tensor | None = None


def with_targets(out: SegmentationOutput, **targets) -> View:
    """The model's maps of a view plus its targets (pseudo_label, confidence, ignore_mask, cutmix_box)."""
    return View(**vars(out), **targets)


@dataclass
class Prediction:
    """What the forward passes of one UniMatch step give: predictions, features and pseudo-labels.

    labeled_logits  (B_l, K, H, W) the labeled images' logits, trained on labeled_mask (B_l, H, W)
    weak            u_w in train mode (the clean half of the feature-perturbation pass): its features
                    carry gradient, its logits are detached (they only make targets), its pseudo-label
                    is its own argmax, and logits_fp holds the perturbed copy's logits
    mix             the mix image's weak view in eval mode, without gradient: the source of every
                    pasted region's pseudo-label and features
    strong_views    the CutMixed strong views u_s1, u_s2 (with gradient); their targets are the weak
                    pseudo-labels with each box pasted from the mix view's
    """

    labeled_logits: torch.Tensor
    labeled_mask: torch.Tensor
    weak: View
    mix: View
    strong_views: list[View]

    def weak_cutmixed(self, view: View, name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The weak view of the content of strong view `view`: the map `name` (a SegmentationOutput
        field: 'encoder', 'decoder', 'logits_low', ...) of the weak view, with the view's box pasted from
        the mix view, resized to `size` (default: the map's own resolution).

        A strong view is u_s with its box pasted from the mix image; its pixel-aligned weak counterpart is
        u_w with the same box pasted from the mix image. Pasting the two weak forwards' outputs gives it
        without a forward pass of its own (as UniMatch builds the strong views' pseudo-labels). The weak
        part carries its gradient; the mix part, from the no-grad eval forward, has none.
        """
        return paste_resized(getattr(self.weak, name), getattr(self.mix, name), view.cutmix_box, size)


def paste_resized(
    image: torch.Tensor, image_mix: torch.Tensor, box: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Two maps (B, C, h, w) resized to `size` (default: their own) and pasted by the full-resolution box
    (B, H, W) sampled at the pixels of that grid."""
    size = tuple(image.shape[-2:]) if size is None else tuple(size)
    return cutmix(resize_feature(image, size), resize_feature(image_mix, size), sample_to_grid(box, size))


def cutmix_truth(truth: torch.Tensor | None, truth_mix: torch.Tensor | None, box: torch.Tensor):
    """The masks of a CutMixed view (for measuring its pseudo-label), or None when there are none."""
    return None if truth is None or truth_mix is None else cutmix(truth, truth_mix, box)


def confidence_and_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, H, W) logits -> max softmax probability and argmax, each (B, H, W)."""
    return logits.softmax(dim=1).max(dim=1)


def trained_on(view: View, thresh: float) -> torch.Tensor:
    """(B, H, W) bool: the pixels confident_cross_entropy trains on (confident, not crop padding)."""
    return (view.confidence >= thresh) & (view.ignore_mask != IGNORE)


class UniMatch(Method):
    """UniMatch: labeled CE + confident CE on CutMixed strong views and on the feature-perturbed weak view."""

    def predict(self, batch: dict) -> Prediction:
        """The forward passes of one UniMatch step and the pseudo-labels they give.

        Three passes: the mix images in eval mode without gradient; the labeled and weak images with the
        weak view's feature-perturbed copy, as one batch (`unimatch.fp_labeled` adds the labeled images'
        copy, as released); the two CutMixed strong views, as one batch.
        """
        img_x, mask_x = batch["labeled"]
        img_u_w, img_u_s1, img_u_s2, ignore_mask, cutmix_box1, cutmix_box2 = batch["unlabeled"]
        img_u_w_mix, img_u_s1_mix, img_u_s2_mix, ignore_mask_mix, _, _ = batch["mix"]
        truth = batch.get("truth", {})  # the unlabeled images' masks, to measure pseudo-labels only
        model = self.model

        # Pseudo-labels for the pasted regions come from an eval-mode forward of the mix images.
        with torch.no_grad():
            model.eval()
            out_mix = model(img_u_w_mix, features=True)
            conf_mix, label_mix = confidence_and_label(out_mix.logits)
        model.train()
        mix = with_targets(
            out_mix, pseudo_label=label_mix, confidence=conf_mix, ignore_mask=ignore_mask_mix,
            truth=truth.get("mix"),
        )  # fmt: skip

        img_u_s1 = cutmix(img_u_s1, img_u_s1_mix, cutmix_box1)
        img_u_s2 = cutmix(img_u_s2, img_u_s2_mix, cutmix_box2)

        # The labeled and weak images in one pass, with a feature-perturbed copy of the weak ones only
        # (the released code also decodes a perturbed copy of the labeled images, which reaches no loss).
        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        perturb = True if self.cfg["unimatch"]["fp_labeled"] else num_ulb
        out = model(torch.cat((img_x, img_u_w)), features=True, perturb=perturb)
        out_x, out_w = out.split([num_lb, num_ulb])
        out_s = model(torch.cat((img_u_s1, img_u_s2)), features=True).split([num_ulb, num_ulb])

        # Pseudo-labels of the weak view come from the same train-mode forward, without gradient.
        out_w.logits = out_w.logits.detach()
        conf_w, label_w = confidence_and_label(out_w.logits)
        weak = with_targets(
            out_w,
            pseudo_label=label_w,
            confidence=conf_w,
            ignore_mask=ignore_mask,
            truth=truth.get("unlabeled"),
        )

        # Targets of the strong views: the weak pseudo-label, with the pasted box taken from the mix image.
        strong_views = [
            with_targets(
                out_s_k,
                pseudo_label=cutmix(weak.pseudo_label, mix.pseudo_label, box),
                confidence=cutmix(weak.confidence, mix.confidence, box),
                ignore_mask=cutmix(weak.ignore_mask, mix.ignore_mask, box),
                cutmix_box=box,
                truth=cutmix_truth(weak.truth, mix.truth, box),
            )
            for out_s_k, box in zip(out_s, (cutmix_box1, cutmix_box2))
        ]
        return Prediction(out_x.logits, mask_x, weak, mix, strong_views)

    def unimatch_losses(self, p: Prediction) -> tuple[dict, dict]:
        """L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, returned as its weighted terms."""
        thresh = self.cfg["conf_thresh"]
        losses = {"x": self.criterion_l(p.labeled_logits, p.labeled_mask) / 2}
        for k, view in enumerate(p.strong_views, start=1):
            loss_s = confident_cross_entropy(
                view.logits, view.pseudo_label, view.confidence, view.ignore_mask, thresh
            )
            losses[f"s{k}"] = loss_s * 0.25 / 2
            self.pseudo_labels.add("s", view.pseudo_label, trained_on(view, thresh), view.truth)
        weak = p.weak
        loss_fp = confident_cross_entropy(
            weak.logits_fp, weak.pseudo_label, weak.confidence, weak.ignore_mask, thresh
        )
        losses["fp"] = loss_fp * 0.5 / 2
        self.pseudo_labels.add("fp", weak.pseudo_label, trained_on(weak, thresh), weak.truth)

        valid = weak.ignore_mask != IGNORE
        mask_ratio = ((weak.confidence >= thresh) & valid).sum() / valid.sum().clamp(min=1)
        # the pseudo-labels' confidences (B*H*W values): a histogram in TensorBoard at each logged step
        return losses, {"mask_ratio": mask_ratio, "confidence": weak.confidence.flatten()}

    def step(self, batch: dict) -> tuple[dict, dict]:
        return self.unimatch_losses(self.predict(batch))


METHOD = UniMatch

if __name__ == "__main__":
    main(UniMatch)
