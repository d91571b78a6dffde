import pytest
import torch
import torchvision

from model import build_model
from model.backbone.resnet import BACKBONES, load_pretrained
from model.semseg.deeplabv3plus import DeepLabV3Plus, SegmentationOutput

OS_TO_DILATION = {16: (False, False, True), 8: (False, True, True)}
EXPANSION = {"resnet18": 1, "resnet34": 1, "resnet50": 4, "resnet101": 4}


class NotAWeight:
    """Arbitrary picklable object: a weights-only loader must refuse it."""

    def __init__(self):
        self.payload = "anything"


def small_model(**kwargs):
    args = dict(backbone="resnet18", nclass=3, width=8, head_channels=32)
    args.update(kwargs)
    return DeepLabV3Plus(**args)


def randomize_bn(module):
    # fresh BN layers are the identity (mean 0, var 1); random stats make loading mistakes visible
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------- backbones


STEMS = [
    (name, deep_stem)
    for name in BACKBONES
    for deep_stem in ((False, True) if EXPANSION[name] == 4 else (False,))
]


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize(("name", "deep_stem"), STEMS)
@torch.no_grad()
def test_backbone_strides(name, deep_stem, output_stride):
    width = 8
    net = BACKBONES[name](deep_stem, OS_TO_DILATION[output_stride], width=width).eval()
    c1, c2, c3, c4 = net.base_forward(torch.randn(1, 3, 64, 64))

    e = EXPANSION[name]
    assert c1.shape == (1, width * e, 16, 16)
    assert c2.shape == (1, 2 * width * e, 8, 8)
    c3_size = 64 // 16 if output_stride == 16 else 64 // 8
    assert c3.shape == (1, 4 * width * e, c3_size, c3_size)
    assert c4.shape == (1, 8 * width * e, 64 // output_stride, 64 // output_stride)
    assert net.channels == (c1.shape[1], c4.shape[1])


@pytest.mark.parametrize(("name", "deep_stem"), STEMS)
@torch.no_grad()
def test_backbone_channels_at_width_64(name, deep_stem):
    net = BACKBONES[name](deep_stem).eval()
    c1, _, _, c4 = net.base_forward(torch.randn(1, 3, 16, 16))
    expected = (64, 512) if EXPANSION[name] == 1 else (256, 2048)
    assert net.channels == expected
    assert (c1.shape[1], c4.shape[1]) == expected
    assert not hasattr(net, "fc") and not hasattr(net, "avgpool")


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_deep_stem_rejected_for_basic_blocks(name):
    with pytest.raises(ValueError, match="deep_stem"):
        BACKBONES[name](deep_stem=True, width=8)


def test_deep_stem_layout():
    net = BACKBONES["resnet50"](deep_stem=True)
    state = net.state_dict()
    assert state["conv1.0.weight"].shape == (64, 3, 3, 3)
    assert state["conv1.3.weight"].shape == (64, 64, 3, 3)
    assert state["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert state["conv1.1.weight"].shape == state["conv1.4.weight"].shape == (64,)
    assert state["bn1.weight"].shape == (128,)
    assert state["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)


@pytest.mark.parametrize(
    ("name", "dilation"),
    [
        ("resnet18", (False, False, False)),
        ("resnet50", (False, False, False)),
        ("resnet50", (False, True, True)),
    ],
)
@torch.no_grad()
def test_matches_torchvision(name, dilation):
    """Same parameter names and shapes as torchvision, and the same features given the same weights."""
    reference = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=list(dilation))
    randomize_bn(reference)
    reference.eval()
    ours = BACKBONES[name](replace_stride_with_dilation=dilation).eval()

    reference_state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in reference_state.items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    ours.load_state_dict(reference_state)

    x = torch.randn(1, 3, 32, 32)
    y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
    y = reference.layer4(reference.layer3(reference.layer2(reference.layer1(y))))
    torch.testing.assert_close(ours.base_forward(x)[3], y)


def test_backbone_init():
    net = BACKBONES["resnet18"](width=8)
    assert torch.equal(net.bn1.weight, torch.ones(8)) and torch.equal(net.bn1.bias, torch.zeros(8))
    # kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k))
    std = net.layer4[0].conv1.weight.std().item()
    assert abs(std - (2 / (64 * 9)) ** 0.5) < 0.01


# ---------------------------------------------------------------- DeepLabV3+


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deeplab_output_shapes(output_stride):
    model = small_model(output_stride=output_stride).train()
    x = torch.randn(2, 3, 32, 48)

    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, 32, 48)

    out = model(x, features=True)
    assert isinstance(out, SegmentationOutput) and out.logits_fp is None
    assert out.logits.shape == (2, 3, 32, 48)
    assert out.decoder.shape == (2, 32, 8, 12)
    assert out.logits_low.shape == (2, 3, 8, 12)
    # the ASPP output, at the backbone's output stride
    assert out.encoder.shape == (2, 32, 32 // output_stride, 48 // output_stride)
    assert out.low_level.shape[-2:] == (8, 12)
    assert out.feature("encoder") is out.encoder and out.feature("decoder") is out.decoder
    with pytest.raises(ValueError, match="feature level"):
        out.feature("logits")

    out = model(x, features=True, perturb=True)
    assert out.logits.shape == out.logits_fp.shape == (2, 3, 32, 48)
    assert not torch.allclose(out.logits, out.logits_fp)
    assert out.decoder.shape == (2, 32, 8, 12)
    assert out.logits_low.shape == (2, 3, 8, 12)
    assert out.encoder.shape[0] == out.low_level.shape[0] == 2  # the clean half only
    with pytest.raises(ValueError, match="perturb=True needs features=True"):
        model(x, perturb=True)


def test_output_split_is_views_of_every_field():
    model = small_model()
    out = model(torch.randn(3, 3, 32, 32), features=True, perturb=True)
    first, rest = out.split([1, 2])
    assert first.logits.shape[0] == first.logits_fp.shape[0] == first.encoder.shape[0] == 1
    assert rest.low_level.shape[0] == 2
    assert rest.decoder.data_ptr() == out.decoder[1:].data_ptr()  # a view, not a copy
    torch.testing.assert_close(rest.logits_fp, out.logits_fp[1:])


@torch.no_grad()
def test_perturbed_forward_clean_half_matches_plain_forward():
    # eval mode: BN uses running stats, so the clean half does not depend on the perturbed half
    model = small_model()
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)

    out = model(x, features=True, perturb=True)
    torch.testing.assert_close(out.logits, plain)
    assert not torch.allclose(out.logits_fp, plain, atol=1e-3)
    torch.testing.assert_close(out.decoder, model(x, features=True).decoder)


@torch.no_grad()
def test_feature_and_classify():
    model = small_model(head_channels=16)
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 40, 40)
    out = model(x, features=True)
    feature = out.decoder

    assert feature.shape == (2, 16, 10, 10)
    assert (feature >= 0).all() and (feature > 0).any()
    torch.testing.assert_close(model.classify(feature), out.logits_low)
    upsampled = torch.nn.functional.interpolate(
        model.classify(feature), size=(40, 40), mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(upsampled, out.logits)
    torch.testing.assert_close(out.logits, model(x))
    # the decoder re-run from the returned encoder output and low-level feature gives the same feature
    torch.testing.assert_close(model.decode(out.low_level, out.encoder), feature)


def test_head_sizes():
    model = small_model(head_channels=128, dilations=(1, 2, 3))
    assert model.reduce[0].out_channels == 24  # 48 * 128 / 256
    assert model.fuse[0][0].in_channels == 128 + 24
    assert model.aspp.project[0].in_channels == 5 * 128
    assert [b[0].dilation for b in model.aspp.branches[1:4]] == [(1, 1), (2, 2), (3, 3)]
    assert model.classifier.bias is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="output_stride"):
        small_model(output_stride=32)
    with pytest.raises(ValueError, match="resnet152"):
        small_model(backbone="resnet152")


def test_parameter_groups_partition():
    model = small_model(backbone="resnet50", deep_stem=True)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    everything = [id(p) for p in model.parameters()]

    assert backbone and head
    assert not backbone & head
    assert backbone | head == set(everything)
    assert len(model.backbone_parameters()) + len(model.head_parameters()) == len(everything)
    assert backbone == {id(p) for p in model.backbone.parameters()}


def test_build_model_defaults():
    model = build_model({"backbone": "resnet18", "nclass": 5, "backbone_width": 8, "head_channels": 16})
    assert isinstance(model, DeepLabV3Plus)
    assert model.classifier.out_channels == 5
    assert model.backbone.layer4[0].conv1.dilation == (1, 1)  # output stride 16 by default
    assert model.backbone.layer4[1].conv1.dilation == (2, 2)
    assert [b[0].dilation for b in model.aspp.branches[1:4]] == [(6, 6), (12, 12), (18, 18)]


# ---------------------------------------------------------------- pretrained weights


def test_load_torchvision_format(tmp_path):
    source = BACKBONES["resnet18"](width=8)
    randomize_bn(source)
    state = dict(source.state_dict())
    state["fc.weight"] = torch.randn(10, 64)
    state["fc.bias"] = torch.randn(10)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    target = BACKBONES["resnet18"](width=8)
    load_pretrained(target, str(path))
    assert_same_state(source, target)


def test_load_real_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50-torchvision.pth"
    torch.save(reference.state_dict(), path)

    ours = BACKBONES["resnet50"]()
    load_pretrained(ours, path)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_load_deep_stem_format(tmp_path, wrapper):
    source = BACKBONES["resnet50"](deep_stem=True, width=8)
    randomize_bn(source)
    # UniMatch-style checkpoint: no fc, no num_batches_tracked; here also saved from a DataParallel model
    state = {
        f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    if wrapper:
        state = {wrapper: state, "epoch": 3}
    path = tmp_path / "resnet50_deep.pth"
    torch.save(state, path)

    target = BACKBONES["resnet50"](deep_stem=True, width=8)
    load_pretrained(target, path)
    for k, v in source.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, target.state_dict()[k]), k


def save_resnet18_state(tmp_path, edit):
    state = dict(BACKBONES["resnet18"](width=8).state_dict())
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


def test_missing_key_raises(tmp_path):
    path = save_resnet18_state(tmp_path, lambda s: s.pop("layer2.1.bn2.running_var"))
    with pytest.raises(ValueError, match=r"Missing keys.*layer2\.1\.bn2\.running_var") as info:
        load_pretrained(BACKBONES["resnet18"](width=8), path)
    assert str(path) in str(info.value)


def test_unexpected_key_raises(tmp_path):
    path = save_resnet18_state(tmp_path, lambda s: s.update({"layer5.0.conv1.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"Unexpected keys.*layer5\.0\.conv1\.weight"):
        load_pretrained(BACKBONES["resnet18"](width=8), path)


def test_shape_mismatch_raises(tmp_path):
    path = save_resnet18_state(tmp_path, lambda s: s.update({"layer3.0.bn1.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match=r"layer3\.0\.bn1\.weight: checkpoint \(7,\) vs model \(32,\)"):
        load_pretrained(BACKBONES["resnet18"](width=8), path)


def test_width_mismatch_raises(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(BACKBONES["resnet18"](width=16).state_dict(), path)
    with pytest.raises(ValueError, match="conv1.weight"):
        load_pretrained(BACKBONES["resnet18"](width=8), path)


def test_stem_mismatch_hints(tmp_path):
    deep = tmp_path / "deep.pth"
    torch.save(BACKBONES["resnet50"](deep_stem=True, width=8).state_dict(), deep)
    with pytest.raises(ValueError, match=r"conv1\.0\.weight.*set deep_stem: true"):
        load_pretrained(BACKBONES["resnet50"](width=8), deep)

    plain = tmp_path / "plain.pth"
    torch.save(BACKBONES["resnet50"](width=8).state_dict(), plain)
    with pytest.raises(ValueError, match=r"conv1\.weight.*set deep_stem: false"):
        load_pretrained(BACKBONES["resnet50"](deep_stem=True, width=8), plain)


@pytest.mark.parametrize("payload", [NotAWeight(), {"x": NotAWeight()}])
def test_pickled_object_refused(tmp_path, payload):
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_pretrained(BACKBONES["resnet18"](width=8), path)


@pytest.mark.parametrize("payload", [torch.zeros(3), {"epoch": 3}, {}])
def test_not_a_state_dict_refused(tmp_path, payload):
    path = tmp_path / "odd.pth"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="odd.pth"):
        load_pretrained(BACKBONES["resnet18"](width=8), path)


def test_unreadable_file_refused(tmp_path):
    with pytest.raises(ValueError, match="missing.pth"):
        load_pretrained(BACKBONES["resnet18"](width=8), tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pretrained(BACKBONES["resnet18"](width=8), garbage)


def test_build_model_loads_pretrained(tmp_path):
    source = BACKBONES["resnet50"](deep_stem=True, width=8)
    randomize_bn(source)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)

    cfg = {
        "backbone": "resnet50",
        "nclass": 4,
        "deep_stem": True,
        "output_stride": 8,
        "dilations": [12, 24, 36],
        "pretrained": str(path),
        "backbone_width": 8,
        "head_channels": 16,
    }
    model = build_model(cfg)
    assert_same_state(source, model.backbone)
    assert model.backbone.layer3[1].conv2.dilation == (2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)
