"""A run directory is never lost by a mistyped command: a rerun into a directory that holds a run is refused before
any work starts, ``--resume`` needs a run to continue, ``--overwrite`` replaces the earlier run's files (and only
those)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from reference_run import ROOT, command

from fedsim.results import RunDirectory, RunDirectoryError


def digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` (but the lock) with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def run_cli(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """The CLI with a private TMPDIR, so a Ray start would leave its fedsim-ray-* folder there."""
    tmp.mkdir(exist_ok=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.ray  # the shared reference run (tests/reference_run.py)
def test_a_rerun_into_a_finished_run_is_refused_before_any_work_and_changes_nothing(reference, tmp_path):
    before = digest(reference)
    result = run_cli(command(reference.parent, "reference"), tmp_path / "tmp")
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert "already holds a run (5 rounds, 8 leakage rows)" in line and "--resume" in line and "--overwrite" in line
    assert digest(reference) == before
    assert not list((tmp_path / "tmp").glob("fedsim-ray-*")), "Ray was started for a refused run"


@pytest.mark.ray  # the shared reference run (tests/reference_run.py)
def test_resume_needs_a_run_and_excludes_overwrite(reference, tmp_path):
    missing = run_cli(command(tmp_path, "never-ran") + ["--resume"], tmp_path / "tmp")
    assert missing.returncode == 2 and "no run to continue" in one_line(missing.stderr)
    assert not (tmp_path / "never-ran").exists(), "a refused resume created the directory"
    both = run_cli(command(reference.parent, "reference") + ["--resume", "--overwrite"], tmp_path / "tmp")
    assert both.returncode == 2 and "exclude each other" in one_line(both.stderr)


def test_overwrite_removes_the_earlier_runs_files_and_keeps_the_rest(tmp_path):
    root = tmp_path / "run"
    store = RunDirectory(root)
    store.leakage.append({"round": 1, "client_id": 0, "attack": "x", "psnr_mean": 20.0})
    store.rounds.append({"round": 0, "test_accuracy": 0.1})
    store.write_config({"name": "run"})
    (root / "grids" / "round_001.png").write_bytes(b"png")
    store.close()
    (root / "report.html").write_text("<html>stale</html>")
    (root / "point.json").write_text("{}")  # a sweep's own file beside the run
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        RunDirectory(root)
    assert (root / "leakage.parquet").is_file()
    fresh = RunDirectory(root, "overwrite")
    fresh.close()
    assert (root / "point.json").is_file()
    for gone in ("report.html", "config.json", "leakage.parquet", "rounds.parquet"):
        assert not (root / gone).exists(), gone
    assert not any((root / "grids").iterdir())
    with pytest.raises(RunDirectoryError, match="no run to continue"):  # its config.json went too
        RunDirectory(root, "resume")


def test_attack_into_earlier_results_is_refused_unless_overwrite(tmp_path, synthetic_npz):
    out = tmp_path / "attack"
    base = [sys.executable, "-m", "fedsim.cli", "attack", "--dataset", str(synthetic_npz), "--iterations", "5",
            "--threads", "1", "--output", str(out)]
    first = run_cli(base + ["--indices", "0-2"], tmp_path / "tmp")
    assert first.returncode == 0, first.stderr
    kept = digest(out)
    again = run_cli(base + ["--indices", "5"], tmp_path / "tmp")
    assert again.returncode == 2 and "--overwrite" in one_line(again.stderr)
    assert digest(out) == kept
    replaced = run_cli(base + ["--indices", "5", "--overwrite"], tmp_path / "tmp")
    assert replaced.returncode == 0, replaced.stderr
    assert len(pd.read_parquet(out / "leakage.parquet")) == 1
