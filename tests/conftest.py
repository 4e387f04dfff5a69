"""Shared test helpers: where the fixtures of the original code are, and a few small builders."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def fixtures_dir() -> Path:
    """The outputs of the original code that the tests reproduce: tests/fixtures (copies of
    ../shared/fixtures, so that a clone is self-sufficient), or $SGRAF_SHARED/fixtures."""
    root = os.environ.get("SGRAF_SHARED")
    path = Path(root) / "fixtures" if root else REPO / "tests" / "fixtures"
    if not path.is_dir():
        # Fail, never skip: a missing fixtures directory must turn CI red.
        raise RuntimeError(f"fixtures not found at {path}")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (tests/test_cuda.py; skipped "
                                       "where CUDA is not available)")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return fixtures_dir()


@pytest.fixture(scope="session")
def original_vocab() -> Path:
    """The original SCAN and NAAF vocabularies, shipped in vocab/ (the files of ../shared/vocab)."""
    return REPO / "vocab"


@pytest.fixture
def one_thread():
    """One torch thread for a test module of tiny tensors (faster, and immune to a busy
    machine): `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
