"""ResNet backbones for segmentation: dilation instead of stride in the last stages, optional deep stem.

Parameter names follow torchvision's layout (conv1, bn1, layer1..layer4, downsample.0/1), so ImageNet
checkpoints load by name. The deep stem follows UniMatch's checkpoints (conv1.0/1/3/4/6 + a 128-channel bn1).
`load_pretrained` takes a file path or a torchvision weight name (`torchvision`, `torchvision:IMAGENET1K_V2`).
"""

import logging

import torch
from torch import nn

from model.weights import is_torchvision_name, load_weights_file, torchvision_weights_file

logger = logging.getLogger("semiseg.model")  # a child of the training log: shown in train.log


def conv3x3(in_planes, out_planes, stride=1, dilation=1):
    # padding = dilation keeps the spatial size for stride 1
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Both convs use `dilation`; the stride sits on the first."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101). Stride and dilation sit on the 3x3 conv ("ResNet v1.5")."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet without the classification head; `base_forward` returns the four stage outputs.

    Args:
        block: BasicBlock or Bottleneck.
        layers: number of blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
        deep_stem: three 3x3 convs instead of the 7x7 conv (Bottleneck ResNets only).
        replace_stride_with_dilation: for layer2..layer4, use dilation instead of stride 2.
            (False, False, True) gives output stride 16, (False, True, True) output stride 8.
        width: base channel count; 64 is the standard network (and the only one pretrained weights fit).
        arch: the network's name ('resnet101', ...), which picks torchvision's weights by name.
    """

    def __init__(
        self,
        block,
        layers,
        deep_stem=False,
        replace_stride_with_dilation=(False, False, True),
        width=64,
        arch=None,
    ):
        super().__init__()
        self.arch = arch
        if deep_stem and block is not Bottleneck:
            raise ValueError("deep_stem is only supported for resnet50/resnet101 (Bottleneck blocks)")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation needs 3 entries (layer2..4): {replace_stride_with_dilation}"
            )

        self.deep_stem = deep_stem
        self.dilation = 1
        if deep_stem:
            self.inplanes = width * 2
            self.conv1 = nn.Sequential(
                conv3x3(3, width, stride=2),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                conv3x3(width, width),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                conv3x3(width, width * 2),
            )
        else:
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, replace_stride_with_dilation[2])

        # channels of c1 (decoder skip connection) and c4 (ASPP input)
        self.channels = (width * block.expansion, width * 8 * block.expansion)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, num_blocks, stride=1, dilate=False):
        # The first block of a dilated stage still sees the previous resolution, so it keeps the previous
        # dilation; the following blocks use the increased one.
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1

        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )

        blocks = [block(self.inplanes, planes, stride, previous_dilation, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, num_blocks):
            blocks.append(block(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*blocks)

    def base_forward(self, x):
        """x: (B, 3, H, W) -> c1 (stride 4), c2 (stride 8), c3, c4 (stride 8, 16 or 32 by the dilation)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4

    def forward(self, x):
        return self.base_forward(x)


def resnet18(deep_stem=False, replace_stride_with_dilation=(False, False, True), width=64):
    return ResNet(BasicBlock, (2, 2, 2, 2), deep_stem, replace_stride_with_dilation, width, arch="resnet18")


def resnet34(deep_stem=False, replace_stride_with_dilation=(False, False, True), width=64):
    return ResNet(BasicBlock, (3, 4, 6, 3), deep_stem, replace_stride_with_dilation, width, arch="resnet34")


def resnet50(deep_stem=False, replace_stride_with_dilation=(False, False, True), width=64):
    return ResNet(Bottleneck, (3, 4, 6, 3), deep_stem, replace_stride_with_dilation, width, arch="resnet50")


def resnet101(deep_stem=False, replace_stride_with_dilation=(False, False, True), width=64):
    return ResNet(Bottleneck, (3, 4, 23, 3), deep_stem, replace_stride_with_dilation, width, arch="resnet101")


BACKBONES = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}


def _format_keys(keys, limit=10):
    keys = sorted(keys)
    text = ", ".join(keys[:limit])
    if len(keys) > limit:
        text += f", ... ({len(keys) - limit} more)"
    return text


def _read_state_dict(path):
    """Read a checkpoint (weights only) and return a flat {name: tensor} dict."""
    checkpoint = load_weights_file(path, what="pretrained weights")

    if isinstance(checkpoint, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(checkpoint.get(wrapper), dict):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"'{path}' does not contain a state dict (got {type(checkpoint).__name__})")

    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"'{path}': entry '{key}' is a {type(value).__name__}, not a tensor")
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def _stem_hint(checkpoint_keys, model_keys):
    if "conv1.0.weight" in checkpoint_keys and "conv1.weight" in model_keys:
        return " This looks like a deep-stem checkpoint; set deep_stem: true."
    if "conv1.weight" in checkpoint_keys and "conv1.0.weight" in model_keys:
        return " This looks like a 7x7-stem (torchvision) checkpoint; set deep_stem: false."
    return ""


def load_pretrained(backbone, pretrained):
    """Load ImageNet weights into `backbone` (a ResNet), checking every key and shape.

    `pretrained` is a file path, or 'torchvision' / 'torchvision:TAG' for torchvision's weights of the
    backbone's architecture (taken from torch.hub's cache, downloaded there on first use).
    Files may be torchvision checkpoints (7x7 stem; `fc.*` is ignored) or UniMatch's deep-stem checkpoints,
    as a plain state dict or wrapped under 'state_dict' / 'model', with or without a 'module.' prefix.
    Raises ValueError naming the file and the offending keys on any mismatch.
    """
    path = str(pretrained)
    if is_torchvision_name(path):
        path = torchvision_weights_file(path, backbone.arch, backbone.deep_stem)
    checkpoint = _read_state_dict(path)
    model_state = backbone.state_dict()

    ignored = sorted(k for k in checkpoint if k.startswith("fc.") and k not in model_state)
    unexpected = [k for k in checkpoint if k not in model_state and k not in ignored]
    # older checkpoints have no BN batch counters; they carry no learned information
    missing = [k for k in model_state if k not in checkpoint and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        message = f"pretrained weights '{path}' do not match the backbone."
        if missing:
            message += f" Missing keys: {_format_keys(missing)}."
        if unexpected:
            message += f" Unexpected keys: {_format_keys(unexpected)}."
        message += _stem_hint(checkpoint, model_state)
        raise ValueError(message)

    mismatched = [
        f"{k}: checkpoint {tuple(checkpoint[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in checkpoint and checkpoint[k].shape != v.shape
    ]
    if mismatched:
        message = f"pretrained weights '{path}' have wrong shapes: " + "; ".join(mismatched[:10])
        if len(mismatched) > 10:
            message += f"; ... ({len(mismatched) - 10} more)"
        message += ". (Pretrained weights only fit backbone_width 64 and the matching depth.)"
        raise ValueError(message)

    state_dict = {k: v for k, v in checkpoint.items() if k not in ignored}
    for k, v in model_state.items():
        state_dict.setdefault(k, v)  # only num_batches_tracked can be absent here
    backbone.load_state_dict(state_dict, strict=True)

    num_loaded = len(checkpoint) - len(ignored)
    logger.info("loaded %d pretrained tensors from %s (ignored: %s)", num_loaded, path, ignored or "none")
