"""A per-pixel network for the methods' step tests, and the per-pixel arithmetic their loop references use.

PointwiseNet has the segmentation model's call signature, but every map it returns sits at the input's
resolution and depends on one input pixel only: the feature is sigmoid(conv1x1(x)) (non-negative, as the
decoder's), the logits conv1x1(feature). So a test can recompute any term of a step pixel by pixel, with
plain loops over pixels, classes and images, and the stride-4 grid of the real model is the identity.
The step tests call each method's own `step` on it; the references below use Python floats only.
"""

import math

import torch
from torch import nn

from model.semseg.deeplabv3plus import SegmentationOutput

IGNORE = 255


class PointwiseNet(nn.Module):
    """feature = sigmoid(W_f x + b_f) (C channels), logits = W_c feature + b_c (K classes); maps (B, ., H, W).

    The feature perturbation of UniMatch's pass is a fixed halving of the feature (no dropout draws), and
    decode(low_level, encoder) = encoder: MLCL's encoder-level SAI then classifies the perturbed feature.
    """

    def __init__(self, nclass: int = 3, channels: int = 4, seed: int = 0, spread: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.feature_conv = nn.Conv2d(3, channels, 1)
        self.classifier = nn.Conv2d(channels, nclass, 1)
        with torch.no_grad():
            self.feature_conv.weight.copy_(torch.randn(channels, 3, 1, 1, generator=g) * 2)
            self.feature_conv.bias.copy_(torch.randn(channels, generator=g) * 0.5)
            # Wide logits, centred on the feature's midpoint 0.5: the class varies from pixel to pixel and
            # the confidences spread over (1/K, 1), so that thresholds split the pixels.
            weight = torch.randn(nclass, channels, generator=g) * spread
            self.classifier.weight.copy_(weight[:, :, None, None])
            self.classifier.bias.copy_(-0.5 * weight.sum(dim=1) + 0.3 * torch.randn(nclass, generator=g))

    def forward(self, x, features=False, perturb=False):
        feature = torch.sigmoid(self.feature_conv(x))
        logits = self.classifier(feature)
        if not features:
            return logits
        num_fp = x.shape[0] if perturb is True else int(perturb)  # the last num_fp images
        logits_fp = self.classifier(feature[x.shape[0] - num_fp :] * 0.5) if num_fp else None
        return SegmentationOutput(logits, logits, feature, feature, x, logits_fp)

    def decode(self, low_level, encoder):
        return encoder

    def classify(self, decoder):
        return self.classifier(decoder)


@torch.no_grad()
def maps(net: PointwiseNet, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature, logits, logits of the halved feature) of `image` (B, 3, H, W), without gradient."""
    feature = torch.sigmoid(net.feature_conv(image))
    return feature, net.classifier(feature), net.classifier(feature * 0.5)


# ------------------------------------------------------------------------------ per-pixel arithmetic
def vec(t: torch.Tensor, b: int, y: int, x: int) -> list[float]:
    """The channel vector of map t (B, C, H, W) at pixel (b, y, x)."""
    return [float(v) for v in t[b, :, y, x]]


def pixels(t: torch.Tensor) -> list[tuple[int, int, int]]:
    """(b, y, x) of every pixel of a (B, H, W) or (B, C, H, W) map."""
    B, H, W = t.shape[0], t.shape[-2], t.shape[-1]
    return [(b, y, x) for b in range(B) for y in range(H) for x in range(W)]


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [v / sum(e) for v in e]


def ce(values: list[float], label: int) -> float:
    """-log softmax(values)[label]."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values)) - values[label]


def argmax_conf(values: list[float]) -> tuple[int, float]:
    prob = softmax(values)
    best = max(range(len(prob)), key=lambda k: prob[k])
    return best, prob[best]


def cos(a: list[float], b: list[float], eps: float = 1e-6) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (max(math.sqrt(sum(x * x for x in a)), eps) * max(math.sqrt(sum(y * y for y in b)), eps))


def mean_ce(logits: torch.Tensor, label: torch.Tensor) -> float:
    """Mean cross-entropy over the pixels whose label is not IGNORE."""
    terms = [ce(vec(logits, *p), int(label[p])) for p in pixels(label) if label[p] != IGNORE]
    return sum(terms) / max(len(terms), 1)


def paste(inside, outside, box: torch.Tensor, b: int, y: int, x: int):
    """What a CutMixed map shows at a pixel: `inside` (the mix image's) in the box, `outside` elsewhere."""
    return inside if box[b, y, x] else outside


def mix_padded_elsewhere(batch: dict) -> dict:
    """The batch with its mix images padded in their last column instead of their last row(s), so that a
    target whose padding comes from the wrong image of a CutMix differs (make_batch pads both alike)."""
    ignore_mix = torch.zeros_like(batch["mix"][3])
    ignore_mix[..., -1] = IGNORE
    mix = list(batch["mix"])
    mix[3] = ignore_mix
    return {**batch, "mix": tuple(mix)}


# ------------------------------------------------------------------------------ UniMatch's targets
class UniMatchReference:
    """UniMatch's step recomputed pixel by pixel on a PointwiseNet: the pseudo-labels of the weak view and
    of each CutMixed strong view (weak outside its box, the mix image's inside), and the four terms.

    weak      {(b, y, x): (label, confidence, valid)} of u_w
    strong    per strong view k, the same for its content
    maps      feature, logits, perturbed logits of u_w ('weak'), the mix image ('mix') and the strong views
    """

    def __init__(self, net: PointwiseNet, batch: dict):
        img_x, self.mask_x = batch["labeled"]
        u_w, u_s1, u_s2, ignore, box1, box2 = batch["unlabeled"][:6]
        m_w, m_s1, m_s2, ignore_mix = batch["mix"][:4]
        self.boxes = (box1, box2)
        self.maps = {"labeled": maps(net, img_x), "weak": maps(net, u_w), "mix": maps(net, m_w)}
        strong_images = []
        for image, image_mix, box in ((u_s1, m_s1, box1), (u_s2, m_s2, box2)):
            mixed = image.clone()
            for b, y, x in pixels(box):
                if box[b, y, x]:
                    mixed[b, :, y, x] = image_mix[b, :, y, x]
            strong_images.append(mixed)
        self.maps["strong"] = [maps(net, image) for image in strong_images]
        self.ignore = ignore

        def targets(logits, ignore_map):
            out = {}
            for p in pixels(ignore_map):
                label, conf = argmax_conf(vec(logits, *p))
                out[p] = (label, conf, ignore_map[p] != IGNORE)
            return out

        self.weak = targets(self.maps["weak"][1], ignore)
        mix = targets(self.maps["mix"][1], ignore_mix)
        self.strong = [{p: paste(mix[p], self.weak[p], box, *p) for p in self.weak} for box in self.boxes]

    def assert_informative(self, thresh: float) -> None:
        """The inputs can tell a right step from a wrong one: each weak image shows two classes or more,
        the threshold splits its pixels, and each strong view's box pastes other labels than u_w's."""
        for b in {p[0] for p in self.weak}:
            assert len({label for p, (label, _, _) in self.weak.items() if p[0] == b}) > 1, "one class"
        confident = [conf >= thresh for label, conf, ok in self.weak.values() if ok]
        assert any(confident) and not all(confident), "the threshold does not split the pixels"
        for strong in self.strong:
            assert any(strong[p][0] != self.weak[p][0] for p in strong), "the box pastes the same labels"

    def confident_ce(self, logits: torch.Tensor, targets: dict, thresh: float, weight=None) -> float:
        """sum over valid pixels of [conf >= thresh] w_p CE_p, over the number of valid pixels."""
        total, valid = 0.0, 0
        for p, (label, conf, ok) in targets.items():
            if not ok:
                continue
            valid += 1
            if conf >= thresh:
                total += (1.0 if weight is None else weight[p]) * ce(vec(logits, *p), label)
        return total / max(valid, 1)

    def terms(self, thresh: float) -> dict:
        """UniMatch's weighted terms: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2."""
        return {
            "x": mean_ce(self.maps["labeled"][1], self.mask_x) / 2,
            "s1": self.confident_ce(self.maps["strong"][0][1], self.strong[0], thresh) * 0.25 / 2,
            "s2": self.confident_ce(self.maps["strong"][1][1], self.strong[1], thresh) * 0.25 / 2,
            "fp": self.confident_ce(self.maps["weak"][2], self.weak, thresh) * 0.5 / 2,
        }

    def weak_of_strong(self, k: int, which: int) -> torch.Tensor:
        """Map `which` (0 feature, 1 logits) of the weak view of strong view k's content: u_w's, with the
        box pasted from the mix image's."""
        weak, mix, box = self.maps["weak"][which], self.maps["mix"][which], self.boxes[k]
        out = weak.clone()
        for b, y, x in pixels(box):
            if box[b, y, x]:
                out[b, :, y, x] = mix[b, :, y, x]
        return out


def assert_terms(got: dict, expected: dict, rel: float = 1e-5) -> None:
    """The step's terms, by name, equal the reference's (and there are no others)."""
    assert set(got) == set(expected), f"terms {sorted(got)}, expected {sorted(expected)}"
    for name, value in expected.items():
        value_got = float(got[name].detach())
        assert math.isclose(value_got, value, rel_tol=rel, abs_tol=1e-9), (
            f"term '{name}': {value_got!r}, expected {value!r}"
        )
