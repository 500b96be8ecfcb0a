from pathlib import Path

import numpy as np
import pytest
import torch
from environment import env_path_or_skip


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-image fixtures (../shared/data in CI)."""
    return env_path_or_skip("FEDSIM_DATA_DIR", "directory", "tests on real images")


@pytest.fixture(scope="session")
def browser() -> Path:
    """A Chromium binary for the report's browser tests (Debian's chromium in CI)."""
    return env_path_or_skip("FEDSIM_BROWSER", "file", "headless-browser tests")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where tests leave files for a person to look at (screenshots): test-artifacts/ in the checkout."""
    path = Path(__file__).resolve().parents[1] / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def cifar_test(data_dir):
    from fedsim.data import load_dataset

    return load_dataset("cifar10", "test")


@pytest.fixture
def synthetic_npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(120, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(120) % 10
    path = tmp_path / "synthetic.npz"
    np.savez_compressed(path, images=images, labels=labels)
    return path


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def float64():
    """Default dtype float64 for the test (exactness checks that float32 rounding would blur)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


OUTSIDE_PLUGIN = Path(__file__).parent / "outside_plugin"  # a package with a dist-info, as pip would install it


@pytest.fixture
def outside(monkeypatch):
    """The outside package (tests/outside_plugin), importable here and in Ray worker processes (PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(OUTSIDE_PLUGIN))
    monkeypatch.setenv("PYTHONPATH", str(OUTSIDE_PLUGIN))
    import fedsim_outside

    return fedsim_outside


@pytest.fixture
def ray_local():
    """A private one-CPU Ray instance for attacker-pool tests (no Flower)."""
    import tempfile

    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=100 * 1024 * 1024, _temp_dir=tempfile.mkdtemp(prefix="fsray-"))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir) -> Path:
    """The run directory of one uninterrupted ``fedsim run`` (tests/reference_run.py), shared by every test that
    compares another way of running the same experiment against it."""
    import subprocess

    from reference_run import ROOT, command

    tmp = tmp_path_factory.mktemp("reference")
    done = subprocess.run(command(tmp, "reference"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "reference"
