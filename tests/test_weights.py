"""Backbone weights: torchvision's by name (offline, from a planted cache file), guarded loading, layering."""

import ast
import logging
import os
import urllib.error

import pytest
import torch
import torchvision

from model import build_model
from model.backbone.resnet import BACKBONES, load_pretrained
from model.weights import WeightsError, pretrained_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The file names torchvision's weight URLs end in: torch.hub keeps them under these names.
CACHE_NAMES = {
    ("resnet50", "IMAGENET1K_V1"): "resnet50-0676ba61.pth",
    ("resnet50", "IMAGENET1K_V2"): "resnet50-11ad3fa6.pth",
    ("resnet101", "IMAGENET1K_V1"): "resnet101-63fe2227.pth",
    ("resnet101", "IMAGENET1K_V2"): "resnet101-cd907fc2.pth",
}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache; any download attempt fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def model_log():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("semiseg.model")
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def plant(cache, name, seed):
    """A torchvision ResNet-50 state dict with random weights and BN statistics, saved as `name`."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), cache / name)
    return net.state_dict()


def test_cache_names_are_torchvisions():
    for (arch, tag), name in CACHE_NAMES.items():
        weights = torchvision.models.get_model_weights(arch)[tag]
        assert weights.url.endswith("/" + name)


def test_torchvision_name_loads_the_cached_file(torch_home, model_log):
    v1 = plant(torch_home, CACHE_NAMES["resnet50", "IMAGENET1K_V1"], seed=1)
    v2 = plant(torch_home, CACHE_NAMES["resnet50", "IMAGENET1K_V2"], seed=2)
    for name, expected in (
        ("torchvision", v1),
        ("torchvision:IMAGENET1K_V1", v1),
        ("torchvision:IMAGENET1K_V2", v2),
    ):
        ours = BACKBONES["resnet50"]()
        load_pretrained(ours, name)
        for k, v in ours.state_dict().items():
            assert torch.equal(v, expected[k]), (name, k)
    messages = [r.getMessage() for r in model_log]
    assert any("IMAGENET1K_V2" in m and CACHE_NAMES["resnet50", "IMAGENET1K_V2"] in m for m in messages)


def test_build_model_with_torchvision_weights(torch_home):
    v2 = plant(torch_home, CACHE_NAMES["resnet50", "IMAGENET1K_V2"], seed=3)
    cfg = {"backbone": "resnet50", "nclass": 3, "pretrained": "torchvision:DEFAULT", "head_channels": 16}
    model = build_model(cfg)  # DEFAULT is V2 in torchvision
    assert torch.equal(model.backbone.layer4[2].conv3.weight, v2["layer4.2.conv3.weight"])
    assert torch.equal(model.backbone.bn1.running_var, v2["bn1.running_var"])


def test_missing_cache_file_names_url_and_path(torch_home):
    with pytest.raises(WeightsError) as info:
        load_pretrained(BACKBONES["resnet101"](width=8), "torchvision")
    text = str(info.value)
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in text
    assert str(torch_home / "resnet101-63fe2227.pth") in text and "no network" in text


@pytest.mark.parametrize(
    "name, arch, deep_stem, message",
    [
        ("torchvision", "resnet101", True, "set deep_stem: false"),
        ("torchvision:IMAGENET1K_V3", "resnet50", False, "IMAGENET1K_V1, IMAGENET1K_V2"),
        ("torchvision", None, False, "no ImageNet weights for backbone 'None'"),
    ],
)
def test_bad_torchvision_names(torch_home, name, arch, deep_stem, message):
    net = BACKBONES[arch or "resnet50"](deep_stem=deep_stem, width=8)
    net.arch = arch
    with pytest.raises(WeightsError, match=message):
        load_pretrained(net, name)
    # the same problem is found before training, without building anything
    assert message in pretrained_problem(name, str(arch), deep_stem)


def test_pretrained_problem(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert pretrained_problem(None, "resnet101", True) is None
    assert pretrained_problem(str(weights), "resnet101", True) is None
    assert pretrained_problem("torchvision:IMAGENET1K_V2", "resnet101", False) is None
    assert "does not exist" in pretrained_problem(str(tmp_path / "nope.pth"), "resnet101", True)
    assert "resnet152" in pretrained_problem("torchvision", "resnet152", False)


def test_pickled_code_in_the_cache_is_refused(torch_home):
    torch_home.mkdir(parents=True)
    path = torch_home / CACHE_NAMES["resnet50", "IMAGENET1K_V1"]
    torch.save({"conv1.weight": torch.zeros(1), "hook": os.getcwd}, path)
    with pytest.raises(WeightsError, match="pickled code.*nothing in it was executed"):
        load_pretrained(BACKBONES["resnet50"](width=8), "torchvision")


def test_flipped_byte_in_a_weights_file_is_caught(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(BACKBONES["resnet18"](width=8).state_dict(), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside tensor data: torch.load alone would read the changed value
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="CRC-32"):
        load_pretrained(BACKBONES["resnet18"](width=8), str(path))


def test_model_imports_nothing_from_util():
    offenders = []
    for folder, _, names in os.walk(os.path.join(ROOT, "model")):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                else:
                    continue
                offenders += [f"{path}: {m}" for m in modules if m == "util" or m.startswith("util.")]
    assert not offenders
