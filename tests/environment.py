"""Paths the tests take from the environment: unset means the tests that need it skip; set to a missing path fails."""

import os
from pathlib import Path

import pytest


def env_path(variable: str, kind: str) -> Path | None:
    """``$variable`` as a path that must exist as a ``kind`` ("directory" or "file"); None when unset."""
    value = os.environ.get(variable)
    if not value:
        return None
    path = Path(value)
    if not (path.is_dir() if kind == "directory" else path.is_file()):
        pytest.fail(f"{variable}={value} is not a {kind}")
    return path


def env_path_or_skip(variable: str, kind: str, needed_by: str) -> Path:
    """``env_path`` for a fixture: unset skips the test, naming what is skipped."""
    path = env_path(variable, kind)
    if path is None:
        pytest.skip(f"{variable} is not set: {needed_by} are skipped")
    return path
