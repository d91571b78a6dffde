"""DeepLabV3+ (Chen et al., 2018) on a dilated ResNet, with UniMatch's feature perturbation."""

from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone.resnet import BACKBONES, load_pretrained

FEATURE_LEVELS = ("encoder", "decoder")  # the two feature maps methods align or perturb


@dataclass
class SegmentationOutput:
    """Every map one forward computes that a method reads, for a batch of B images of size H x W.

    logits      (B, K, H, W)    the prediction, upsampled to the input size
    logits_low  (B, K, h, w)    the classifier's output on the stride-4 grid (h, w) = (H/4, W/4)
    decoder     (B, C, h, w)    the decoder feature F that the classifier reads, non-negative
    encoder     (B, C, h', w')  the encoder output (ASPP) at the backbone's output stride (16 or 8)
    low_level   (B, C1, h, w)   the backbone's stride-4 feature; `decode(low_level, encoder)` = decoder
    logits_fp   (B, K, H, W)    the logits of the feature-perturbed copy (forward with perturb=True);
                (n, K, H, W), those of the last n images, with perturb=n
    """

    logits: torch.Tensor
    logits_low: torch.Tensor
    decoder: torch.Tensor
    encoder: torch.Tensor
    low_level: torch.Tensor
    logits_fp: torch.Tensor | None = None

    def feature(self, level: str) -> torch.Tensor:
        """The feature map of a level named as in the configs: 'encoder' or 'decoder'."""
        if level not in FEATURE_LEVELS:
            raise ValueError(f"feature level must be one of {FEATURE_LEVELS}, got {level!r}")
        return getattr(self, level)

    def split(self, sizes: list[int]) -> list["SegmentationOutput"]:
        """Split every field along the batch dimension (views, no copies), as torch.split does.

        `logits_fp` may cover only the last images (forward with perturb=n): it is split with the parts
        those images fall in, and the parts before them get None."""
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "logits_fp"}
        parts = {name: t.split(sizes) for name, t in parts.items()}
        parts["logits_fp"] = [None] * len(sizes)
        if self.logits_fp is not None:
            skipped = sum(sizes) - self.logits_fp.shape[0]  # the images before the perturbed ones
            first = next((i for i in range(len(sizes)) if sum(sizes[:i]) == skipped), None)
            if first is None:
                raise ValueError(f"logits_fp's last {self.logits_fp.shape[0]} rows do not fall on {sizes}")
            parts["logits_fp"][first:] = self.logits_fp.split(sizes[first:])
        return [type(self)(**{name: t[i] for name, t in parts.items()}) for i in range(len(sizes))]


@contextmanager
def running_stats_frozen(module: nn.Module):
    """Inside, the BatchNorm layers of `module` still normalise a train-mode batch by its own statistics
    (the output and its gradient are unchanged) but leave their running statistics and batch count alone."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = [m for m in layers if m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # in train mode: batch statistics, no running update
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def use_channels_last(net: nn.Module, device: torch.device) -> None:
    """Channels-last memory format for the weights of `net` (on `device`), which makes its convolutions
    compute channels-last activations: faster convolutions on GPUs and on CPUs (oneDNN).

    On a CPU, every DeepLabV3Plus in `net` keeps layer3, layer4 and the ASPP in the standard format (its
    input is converted at layer3): oneDNN copies each channels-last weight gradient once per convolution
    and backward, which in those stages (small maps, most of the weights) costs more than channels-last
    saves. Measured on a 2-core CPU: docs/benchmark.md.
    """
    net.to(memory_format=torch.channels_last)
    if device.type != "cpu":
        for m in net.modules():
            if isinstance(m, DeepLabV3Plus):
                m.backbone.deep_memory_format = torch.channels_last
        return
    for m in net.modules():
        if isinstance(m, DeepLabV3Plus):
            for stage in (m.backbone.layer3, m.backbone.layer4, m.aspp):
                stage.to(memory_format=torch.contiguous_format)


class AtrousConv2d(nn.Conv2d):
    """A 3x3 convolution with dilation d and zero padding d (stride 1), as in ASPP's branches.

    The kernel's top and bottom rows look d pixels above and below: on a map at most d high, every one of
    their taps falls into the zero padding, and likewise for the side columns on a map at most d wide.
    Those taps multiply zeros, so they are left out of the call: the same output and gradients (the
    left-out weights get zero gradient either way) for up to 9x less work, e.g. ASPP's rates 12 and 18 on
    the 9x9 map of a 129-pixel crop. `skip_padding_taps = False` runs the whole kernel.
    """

    skip_padding_taps = True

    def __init__(self, in_channels: int, out_channels: int, dilation: int, bias: bool = False):
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (dh, dw), (h, w) = self.dilation, x.shape[-2:]
        rows, cols = dh < h, dw < w  # whether the outer rows / columns see any pixel
        if not self.skip_padding_taps or (rows and cols):
            return super().forward(x)
        weight = self.weight[:, :, slice(None) if rows else slice(1, 2), slice(None) if cols else slice(1, 2)]
        padding = (dh if rows else 0, dw if cols else 0)
        return F.conv2d(x, weight, self.bias, 1, padding, self.dilation)


def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    if kernel_size == 3 and dilation > 1:
        conv = AtrousConv2d(in_channels, out_channels, dilation)
    else:
        padding = dilation * (kernel_size - 1) // 2
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                         bias=False)  # fmt: skip
    return nn.Sequential(
        conv,
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool -> 1x1 conv -> BN -> ReLU -> broadcast back to h x w."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))  # (B, C, 1, 1)
        return F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per dilation, and image pooling."""

    def __init__(self, in_channels, out_channels, dilations):
        super().__init__()
        branches = [conv_bn_relu(in_channels, out_channels, 1)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, d) for d in dilations]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(len(branches) * out_channels, out_channels, 1)

    def forward(self, x):
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with a ResNet backbone.

    Args:
        backbone: 'resnet18', 'resnet34', 'resnet50' or 'resnet101'.
        nclass: number of classes K.
        deep_stem: use the three-conv stem (resnet50/101 only; needs matching pretrained weights).
        output_stride: 16 or 8, the stride of the backbone's last stage.
        dilations: dilation rates of the three 3x3 ASPP branches.
        pretrained: path to ImageNet weights for the backbone, or None for random init.
        width: base channel count of the backbone (64 standard; smaller only for quick CPU runs).
        head_channels: channels of ASPP and decoder (256 standard); the 48-channel skip scales with it.
    """

    def __init__(
        self,
        backbone="resnet101",
        nclass=21,
        deep_stem=False,
        output_stride=16,
        dilations=(6, 12, 18),
        pretrained=None,
        width=64,
        head_channels=256,
    ):
        super().__init__()
        if output_stride == 16:
            replace_stride_with_dilation = (False, False, True)
        elif output_stride == 8:
            replace_stride_with_dilation = (False, True, True)
        else:
            raise ValueError(f"output_stride must be 16 or 8, got {output_stride}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{backbone}', choose from {sorted(BACKBONES)}")

        self.backbone = BACKBONES[backbone](
            deep_stem=deep_stem, replace_stride_with_dilation=replace_stride_with_dilation, width=width
        )
        if pretrained:
            load_pretrained(self.backbone, pretrained)
        c1_channels, c4_channels = self.backbone.channels

        self.aspp = ASPP(c4_channels, head_channels, dilations)
        reduce_channels = round(48 * head_channels / 256)
        self.reduce = conv_bn_relu(c1_channels, reduce_channels, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(head_channels + reduce_channels, head_channels, 3),
            conv_bn_relu(head_channels, head_channels, 3),
        )
        self.classifier = nn.Conv2d(head_channels, nclass, 1)

    def decode(self, low_level, encoder):
        """Low-level backbone feature (stride 4) and encoder output (ASPP, at the output stride) ->
        decoder feature F (B, head_channels, H/4, W/4), non-negative (after ReLU)."""
        up = F.interpolate(encoder, size=low_level.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([self.reduce(low_level), up], dim=1))

    def classify(self, decoder):
        """Decoder feature (B, head_channels, h, w) -> low-resolution logits (B, K, h, w)."""
        return self.classifier(decoder)

    def forward(self, x, features=False, perturb=False):
        """x: (B, 3, H, W) -> logits (B, K, H, W).

        With features=True, the whole `SegmentationOutput` of x instead. With perturb=True as well, x
        and a channel-dropped copy of its backbone features go through the head as one batch (2B rows,
        so BN batch statistics cover both; UniMatch's feature perturbation), every field describes the
        clean half, and `logits_fp` holds the perturbed half's logits. Dropout is on also in eval mode.
        perturb=n (an int) perturbs only the last n images of x (B + n rows through the head), and
        `logits_fp` has n rows: UniMatch perturbs its unlabeled images, not the labeled ones it
        forwards with them.

        One entry point, so that a DistributedDataParallel wrapper sees every call that has a gradient.
        """
        if perturb is not False and not features:
            raise ValueError("perturb=True needs features=True: logits_fp is a field of SegmentationOutput")
        num_fp = x.shape[0] if perturb is True else int(perturb)
        if not 0 <= num_fp <= x.shape[0]:
            raise ValueError(f"perturb={perturb}: cannot perturb the last {num_fp} of {x.shape[0]} images")
        h, w = x.shape[-2:]
        c1, _, _, c4 = self.backbone.base_forward(x)
        if num_fp:
            c1 = torch.cat([c1, F.dropout2d(c1[-num_fp:], p=0.5, training=True)])
            c4 = torch.cat([c4, F.dropout2d(c4[-num_fp:], p=0.5, training=True)])

        encoder = self.aspp(c4)
        decoder = self.decode(c1, encoder)
        logits_low = self.classify(decoder)
        logits = F.interpolate(logits_low, size=(h, w), mode="bilinear", align_corners=True)
        if not features:
            return logits

        out = SegmentationOutput(logits, logits_low, decoder, encoder, c1)
        if num_fp:
            out, perturbed = out.split([x.shape[0], num_fp])
            out.logits_fp = perturbed.logits
        return out

    def backbone_parameters(self):
        return list(self.backbone.parameters())

    def head_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
