"""Shared test helpers: where ../shared is, and a few small builders."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shared_dir() -> Path:
    """The read-only fixtures directory: $SGRAF_SHARED or ../shared next to the repo."""
    path = Path(os.environ.get("SGRAF_SHARED", REPO.parent / "shared"))
    if not (path / "fixtures").is_dir():
        # Fail, never skip: a missing fixtures directory must turn CI red.
        raise RuntimeError(f"shared fixtures not found at {path}; set SGRAF_SHARED")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture
def one_thread():
    """One torch thread for a test module of tiny tensors (faster, and immune to a busy
    machine): `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
