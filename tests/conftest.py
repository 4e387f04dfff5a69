"""Shared test helpers: where ../shared is, and a few small builders."""
import os
import sys
from pathlib import Path

import pytest

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
