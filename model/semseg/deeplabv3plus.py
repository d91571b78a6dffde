"""DeepLabV3+ (Chen et al., 2018) on a dilated ResNet, with UniMatch's feature perturbation."""

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone.resnet import BACKBONES, load_pretrained


def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
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

    def decode(self, c1, encoder_feature):
        """Low-level backbone feature c1 (stride 4) and encoder output (ASPP, stride 16) -> decoder feature
        F (B, head_channels, H/4, W/4), non-negative (after ReLU)."""
        up = F.interpolate(encoder_feature, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([self.reduce(c1), up], dim=1))

    def classify(self, feature):
        """Decoder feature (B, head_channels, h, w) -> low-resolution logits (B, K, h, w)."""
        return self.classifier(feature)

    def forward(self, x, need_fp=False, need_feature=False):
        """x: (B, 3, H, W).

        Returns logits (B, K, H, W); with need_fp a tuple (logits, logits_fp); with need_feature a dict with
        'logits', 'feature' (decoder, stride 4), 'logits_low' (stride 4), 'encoder_feature' (the encoder's
        output: ASPP, stride 16) and 'low_level' (backbone c1, stride 4), all of the clean input, and, with
        need_fp, 'logits_fp'. `decode(low_level, encoder_feature)` re-runs the decoder from the last two.
        """
        h, w = x.shape[-2:]
        c1, _, _, c4 = self.backbone.base_forward(x)

        if need_fp:
            # UniMatch: the clean and the channel-dropped features go through the head as one batch (2B),
            # so BN statistics cover both. Dropout is always on, also in eval mode.
            c1 = torch.cat([c1, F.dropout2d(c1, p=0.5, training=True)])
            c4 = torch.cat([c4, F.dropout2d(c4, p=0.5, training=True)])

        encoder_feature = self.aspp(c4)
        feature = self.decode(c1, encoder_feature)
        logits_low = self.classify(feature)
        logits = F.interpolate(logits_low, size=(h, w), mode="bilinear", align_corners=True)

        if need_fp:
            logits, logits_fp = logits.chunk(2)
            if not need_feature:
                return logits, logits_fp
            feature, logits_low, encoder_feature, c1 = (
                t.chunk(2)[0] for t in (feature, logits_low, encoder_feature, c1)
            )

        if not need_feature:
            return logits
        out = {
            "logits": logits,
            "feature": feature,
            "logits_low": logits_low,
            "encoder_feature": encoder_feature,
            "low_level": c1,
        }
        if need_fp:
            out["logits_fp"] = logits_fp
        return out

    def backbone_parameters(self):
        return list(self.backbone.parameters())

    def head_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
