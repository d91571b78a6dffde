import pytest

from tests.test_training import TINY


@pytest.fixture
def tiny_config(tmp_path):
    """A config for a tiny demo dataset generated in the test's temporary folder."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path))
    return str(path)
