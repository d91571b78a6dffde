import math

import pytest
import torch
import torch.nn.functional as F

from util.config import ConfigError, load_config
from util.engine import poly_lr
from util.losses import confident_cross_entropy, cross_entropy, ohem_cross_entropy

MINIMAL = """
dataset: demo
data_root: data/demo
nclass: 3
crop_size: 32
val_id_path: v.txt
epochs: 2
batch_size: 2
lr: 0.01
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_config_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["lr=0.5", "demo.size=48", "dilations=[1,2,3]"])
    assert cfg["lr"] == 0.5 and cfg["demo"]["size"] == 48 and cfg["dilations"] == [1, 2, 3]
    assert cfg["conf_thresh"] == 0.95 and cfg["amp"] == "auto"  # defaults filled in
    assert isinstance(load_config(write(tmp_path, MINIMAL.replace("0.01", "1")))["lr"], float)


@pytest.mark.parametrize(
    "extra, overrides, needle",
    [
        ("lrr: 0.1\n", [], "unknown config key 'lrr' (did you mean 'lr'?)"),
        ("", ["demo.sizee=3"], "unknown config key 'demo.sizee'"),
        ("", ["batch_size=two"], "key 'batch_size' must be int"),
        ("", ["deep_stem=1"], "key 'deep_stem' must be bool"),
        ("", ["amp=fp8"], "key 'amp' must be one of"),
        ("", ["dilations=[1,2]"], "key 'dilations' must have 3 items"),
        ("", ["conf_thresh=1.5"], "key 'conf_thresh' must lie in [0, 1]"),
        ("", ["nclass=0"], "key 'nclass' must lie in [1, 254], got 0"),
        ("", ["lr=0"], "key 'lr' must be > 0, got 0"),
        ("", ["log_interval=0"], "key 'log_interval' must lie in [1, inf]"),
        ("", ["eval_scales=[]"], "key 'eval_scales' needs at least 1 item"),
        ("", ["eval_scales=[1.0, -0.5]"], "key 'eval_scales' must be > 0, got [1.0, -0.5]"),
        ("", ["momentum=-1"], "key 'momentum' must lie in [0, 1], got -1"),
        ("", ["batch_size=true"], "key 'batch_size' must be int"),
        ("", ["lr"], "must look like key=value"),
    ],
)
def test_config_errors_name_the_key(tmp_path, extra, overrides, needle):
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)
    assert path in str(err.value) or "key=value" in needle


def test_config_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="required key 'crop_size' is missing"):
        load_config(write(tmp_path, MINIMAL.replace("crop_size: 32\n", "")))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cross_entropy_ignores_255_and_matches_hand_value():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 255]]])
    # one valid pixel with logits (2, 0), true class 0: -log(e^2 / (e^2 + 1))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy(logits, torch.full_like(target, 255)).item() == 0.0


def test_confident_cross_entropy_hand_value():
    # Three pixels: confident and valid, unconfident, padded. Denominator = 2 valid pixels.
    logits = torch.tensor([[[[1.0, 0.0, 3.0]], [[0.0, 2.0, 0.0]]]])
    pseudo = torch.tensor([[[0, 1, 0]]])
    conf = torch.tensor([[[0.99, 0.5, 0.99]]])
    ignore = torch.tensor([[[0, 0, 255]]])
    ce0 = -math.log(math.exp(1) / (math.exp(1) + 1))
    expected = ce0 / 2
    got = confident_cross_entropy(logits, pseudo, conf, ignore, thresh=0.95)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ohem_keeps_hardest_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 5)
    target = torch.randint(0, 3, (1, 4, 5))
    target[0, 0, 0] = 255
    prob_true = logits.softmax(1).gather(1, target.clamp(max=2).unsqueeze(1)).squeeze(1)
    valid = target != 255
    # min_kept larger than the valid count: plain CE over all valid pixels.
    assert ohem_cross_entropy(logits, target, 0.7, 1000).item() == pytest.approx(
        cross_entropy(logits, target).item()
    )
    # min_kept = 5: threshold = max(0.7, 5th smallest true-class probability among all (invalid=1)).
    sorted_p = torch.where(valid, prob_true, torch.ones_like(prob_true)).flatten().sort().values
    thr = max(0.7, float(sorted_p[4]))
    keep = valid & (prob_true <= thr)
    ce = F.cross_entropy(logits, target.clamp(max=2), reduction="none")
    expected = (ce * keep).sum() / keep.sum()
    assert ohem_cross_entropy(logits, target, 0.7, 5).item() == pytest.approx(expected.item(), rel=1e-6)


def test_poly_lr_follows_unimatch_update_order():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 1, 100, 0.9) == 0.01  # lr is updated after the step, so step 1 still uses base
    assert poly_lr(0.01, 51, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)


@pytest.mark.parametrize("name", ["pascal", "cityscapes", "coco", "demo", "camvid"])
def test_configs_restate_no_method_default(name):
    """Defaults live in util/config.py alone: a config's method sections state only what differs, so that
    a changed default reaches every config that does not choose otherwise."""
    from tests.conftest import method_section
    from util.config import defaults

    for section, values in defaults().items():
        if isinstance(values, dict) and section != "demo":  # demo: the generator's settings, stated in full
            method_section(name, section)
