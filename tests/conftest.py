import os

import pytest
import yaml

from tests.test_training import TINY


@pytest.fixture
def tiny_config(tmp_path):
    """A config for a tiny demo dataset generated in the test's temporary folder."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path))
    return str(path)


def method_section(config_name: str, section: str) -> dict:
    """configs/<config_name>.yaml's method `section` as load_config resolves it, after checking that the
    file restates none of the section's defaults (they live in util/config.py only)."""
    from util.config import defaults, load_config

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{config_name}.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f).get(section) or {}
    assert all(value != defaults()[section][key] for key, value in raw.items()), "a default restated"
    return load_config(path)[section]


def make_method(method_cls, model, cfg, criterion):
    """A method around one given network, without a Trainer (as the engine would attach it)."""
    device = next(model.parameters()).device
    method = method_cls(cfg, criterion, device)
    method.attach({"model": model}, {"model": model})
    return method
