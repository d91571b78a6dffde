"""DUEB (Thakur and Kurmi, "Uncertainty and Energy Based Loss Guided Semi-Supervised Semantic Segmentation",
WACV 2025): two branches that teach each other with CPCL's intersection and union pseudo-labels, each
with an aleatoric-uncertainty loss on a predicted per-pixel variance and an energy loss.

    torchrun --nproc_per_node=4 DUEB.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/dueb_366

The paper's method is the default; the `dueb:` config section has a switch for each place where the
released code differs (docs/DIFFERENCES.md). With `dueb.aleatoric=off dueb.energy=off` it is CPCL, the
baseline the paper compares against. Branch 1 is the network that is evaluated and deployed.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import build_model
from unimatch import cutmix, cutmix_truth
from util.data import TrainingData, _mix
from util.engine import Method, Networks, main
from util.losses import IGNORE
from util.losses.dueb import aleatoric_loss, energy_loss, global_cross_labels, weighted_cross_entropy

BRANCHES = (1, 2)  # 1: conservative (intersection labels), 2: progressive (union labels)


class VarianceHead(nn.Module):
    """Per-pixel variance v = softplus(conv1x1(F)) of a branch's decoder feature F, resized to the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        variance = F.softplus(self.conv(feature))
        return F.interpolate(variance, size=size, mode="bilinear", align_corners=True)


def variance_head(channels: int, seed: int) -> VarianceHead:
    """A variance head with PyTorch's default initialisation drawn from `seed`, the same on every rank
    (the released head keeps this random initialisation for the whole run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VarianceHead(channels)


@dataclass
class BranchOutput:
    logits: torch.Tensor  # (B, K, H, W)
    variance: torch.Tensor | None  # (B, 1, H, W); None when the aleatoric loss is off


class DUEB(Method):
    """Two branches on CPCL's intersection/union pseudo-labels + aleatoric and energy losses."""

    def __init__(self, cfg: dict, criterion_l, device: torch.device):
        super().__init__(cfg, criterion_l, device)
        # 'paper', 'released' or 'off' (YAML reads a bare off as false)
        self.aleatoric = cfg["dueb"]["aleatoric"] or "off"
        self.energy = cfg["dueb"]["energy"] or "off"

    def networks(self) -> Networks:
        cfg = self.cfg
        trained = {f"branch{k}": build_model(cfg) for k in BRANCHES}  # independently initialised
        frozen = {}
        if self.aleatoric != "off":
            heads = {
                f"variance{k}": variance_head(cfg["head_channels"], _mix(cfg["seed"], "variance", k))
                for k in BRANCHES
            }
            # paper: trained at the head's learning rate; released: in no optimizer, left at its init
            (trained if self.aleatoric == "paper" else frozen).update(heads)
        return Networks(trained=trained, frozen=frozen, evaluate=("branch1",))

    def training_data(self, pin_memory: bool, save_path: str | None, worker_init=None) -> TrainingData:
        """UniMatch's streams; with dueb.cutmix 'released' every unlabeled image gets three boxes pasted from
        another image (CPS's masks), else UniMatch's single box on half the images from the mix_partner."""
        if self.cfg["dueb"]["cutmix"] == "unimatch":
            return super().training_data(pin_memory, save_path, worker_init)
        return TrainingData(
            self.cfg, True, pin_memory, worker_init, cutmix="three_boxes", mix_partner="other_image"
        )

    def forward_branch(self, k: int, image: torch.Tensor) -> BranchOutput:
        """Logits of branch k and, when the aleatoric loss is on, its variance from the decoder feature."""
        branch = getattr(self, f"branch{k}")
        if self.aleatoric == "off":
            return BranchOutput(branch(image), None)
        out = branch(image, features=True)
        variance = getattr(self, f"variance{k}")(out.decoder, image.shape[-2:])
        return BranchOutput(out.logits, variance)

    @torch.no_grad()
    def teacher(self, k: int, image: torch.Tensor, image_mix: torch.Tensor, box: torch.Tensor) -> tuple:
        """Branch k as its own teacher (train mode, no gradient): its predictions of the two unlabeled
        images CutMixed with `box`, as (hard label, confidence), each (B, H, W)."""
        logits, logits_mix = self.unwrapped(f"branch{k}")(torch.cat((image, image_mix))).chunk(2)
        confidence, label = cutmix(logits, logits_mix, box).float().softmax(dim=1).max(dim=1)
        return label, confidence

    def branch_losses(
        self,
        out: BranchOutput,
        num_labeled: int,
        mask_x: torch.Tensor,
        label: torch.Tensor,
        weight: torch.Tensor,
        noise: torch.Tensor | None,
    ) -> dict:
        """One branch's terms: supervised CE, the confidence-weighted CE on its pseudo-label, and its energy
        and aleatoric terms on the labeled (x0.5, as released) and the CutMixed images (x1). `noise`: the
        aleatoric term's standard normal draws (B, T, K, H, W)."""
        cfg = self.cfg["dueb"]
        sizes = [num_labeled, label.shape[0]]
        logits_x, logits_u = out.logits.split(sizes)
        losses = {
            "x": self.criterion_l(logits_x, mask_x),
            "u": cfg["lambda_u"] * weighted_cross_entropy(logits_u, label, weight, cfg["count_ignored"]),
        }
        w_x, w_u = cfg["weight_labeled"], cfg["weight_unlabeled"]
        if self.energy != "off":
            released = self.energy == "released"
            energy_x, energy_u = (
                energy_loss(logits_x, mask_x, released),
                energy_loss(logits_u, label, released),
            )
            losses["energy"] = w_x * energy_x + w_u * energy_u
        if self.aleatoric != "off":
            released = self.aleatoric == "released"
            noise_x, noise_u = noise.split(sizes)
            variance_x, variance_u = out.variance.split(sizes)
            aleatoric_x = aleatoric_loss(logits_x, variance_x, mask_x, noise_x, released)
            aleatoric_u = aleatoric_loss(logits_u, variance_u, label, noise_u, released)
            losses["aleatoric"] = w_x * aleatoric_x + w_u * aleatoric_u
        return losses

    def step(self, batch: dict) -> tuple[dict, dict]:
        cfg = self.cfg["dueb"]
        img_x, mask_x = batch["labeled"]
        img_u, img_u_s, _, ignore_mask, cutmix_box, _ = batch["unlabeled"]
        img_u_mix, img_u_mix_s, _, ignore_mask_mix, _, _ = batch["mix"]
        truth = batch.get("truth", {})  # the unlabeled images' masks, to measure pseudo-labels only

        # 1. Each branch, as its own teacher, predicts both unlabeled images; the predictions are CutMixed
        #    with the box that will mix the images.
        (pred_1, confidence_1), (pred_2, confidence_2) = (
            self.teacher(k, img_u, img_u_mix, cutmix_box) for k in BRANCHES
        )
        valid = cutmix(ignore_mask, ignore_mask_mix, cutmix_box) != IGNORE

        # 2. Intersection and union pseudo-labels; disagreements are settled by the classes' conflict rates
        #    in the confusion matrix of the global batch.
        targets = global_cross_labels(pred_1, confidence_1, pred_2, confidence_2, valid, self.cfg["nclass"])
        truth_mixed = cutmix_truth(truth.get("unlabeled"), truth.get("mix"), cutmix_box)
        self.pseudo_labels.add("inter", targets.inter_label, targets.inter_weight, truth_mixed)
        self.pseudo_labels.add("union", targets.union_label, targets.union_weight, truth_mixed)

        # 3. Both branches learn from the labeled images and the CutMixed unlabeled image: branch 1 from
        #    the intersection labels, branch 2 from the union labels, weighted by the teachers' confidence.
        if cfg["student_view"] == "weak":
            img_mixed = cutmix(img_u, img_u_mix, cutmix_box)  # released: CutMix the only perturbation
        else:
            img_mixed = cutmix(img_u_s, img_u_mix_s, cutmix_box)
        num_labeled = img_x.shape[0]
        inputs = torch.cat((img_x, img_mixed))
        out_1, out_2 = self.forward_branch(1, inputs), self.forward_branch(2, inputs)
        # The aleatoric term's T Monte-Carlo samples of every image in one draw (global generator, on the
        # device), shared by the branches: each branch's loss is a function of its own parameters, so each
        # still sees independent standard normal draws, and the draws (the costliest part of the term on a
        # CPU) are made once.
        noise = None
        if self.aleatoric != "off":
            B, K, H, W = out_1.logits.shape
            noise = torch.randn((B, cfg["mc_samples"], K, H, W), device=out_1.logits.device)
        targets_1 = (targets.inter_label, targets.inter_weight, noise)
        targets_2 = (targets.union_label, targets.union_weight, noise)
        losses_1 = self.branch_losses(out_1, num_labeled, mask_x, *targets_1)
        losses_2 = self.branch_losses(out_2, num_labeled, mask_x, *targets_2)
        losses = {name: losses_1[name] + losses_2[name] for name in losses_1}

        stats = {
            "agreement": ((pred_1 == pred_2) & valid).sum() / valid.sum().clamp(min=1),
            # the union labels' weights (B*H*W values): a histogram in TensorBoard at each logged step
            "confidence": targets.union_weight.flatten(),
        }
        if out_1.variance is not None:
            stats["variance"] = out_1.variance.detach().mean()
        return losses, stats


METHOD = DUEB

if __name__ == "__main__":
    main(DUEB)
