import pytest

from tests.test_training import TINY


@pytest.fixture
def tiny_config(tmp_path):
    """A config for a tiny demo dataset generated in the test's temporary folder."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path))
    return str(path)


def make_method(method_cls, model, cfg, criterion):
    """A method around one given network, without a Trainer (as the engine would attach it)."""
    device = next(model.parameters()).device
    method = method_cls(cfg, criterion, device)
    method.attach({"model": model}, {"model": model})
    return method
