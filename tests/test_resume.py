"""A run killed with SIGKILL at several points and resumed equals an uninterrupted run (real Flower + Ray, real
processes): the same model checksum per round, each (round, client, attack) row exactly once, the same PSNR."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
ROUNDS, ATTACKED = 4, 2


def command(tmp_path: Path, name: str) -> list[str]:
    overrides = [f'output_dir="{tmp_path}"', f'name="{name}"', "seed=3", "federation.num_clients=4",
                 "federation.clients_per_round=2", f"federation.rounds={ROUNDS}", "data.test_samples=50",
                 f"attack.clients_per_round={ATTACKED}", "attacks.0.iterations=300", "attacks.0.restarts=1"]
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.toml", "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError):
        return pd.DataFrame()


def run_and_kill(cmd: list[str], run: Path, when, what: str) -> None:
    """Start the run and SIGKILL its whole process group (driver, Ray, actors) as soon as ``when`` holds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not when(table(run / "rounds.parquet"), table(run / "leakage.parquet")):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the kill point ({what}): {proc.stderr.read().decode()[-1500:]}")
            if time.time() > deadline:
                pytest.fail(f"kill point never reached: {what}")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resume(cmd: list[str]) -> None:
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def keyed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index(["round", "client_id", "attack"]).sort_index()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("resume")
    done = subprocess.run(command(tmp, "reference"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, table(tmp / "reference" / "rounds.parquet"), table(tmp / "reference" / "leakage.parquet")


def check_equal(run: Path, reference_rounds: pd.DataFrame, reference_rows: pd.DataFrame) -> None:
    rounds, rows = table(run / "rounds.parquet"), table(run / "leakage.parquet")
    assert list(rounds["round"]) == list(range(ROUNDS + 1))
    assert list(rounds["model_checksum"]) == list(reference_rounds["model_checksum"])
    assert not rows.duplicated(["round", "client_id", "attack"]).any(), "a row was written twice"
    assert len(rows) == ROUNDS * ATTACKED and (rows.status == "ok").all()
    ours, theirs = keyed(rows), keyed(reference_rows)
    assert list(ours.index) == list(theirs.index)
    for column in ("psnr_mean", "ssim_mean", "label_accuracy", "matching_loss"):
        assert (ours[column] - theirs[column]).abs().max() < 1e-4, column
    assert not any((run / "queue").iterdir()), "the backlog was not emptied"
    final = torch.load(run / "checkpoints" / f"round_{ROUNDS:03d}.pt", weights_only=True)
    assert final and all(isinstance(v, torch.Tensor) for v in final.values())


def test_reference_run_is_complete(reference):
    _, rounds, rows = reference
    assert list(rounds["round"]) == list(range(ROUNDS + 1)) and rounds["model_checksum"].nunique() == ROUNDS + 1
    assert len(rows) == ROUNDS * ATTACKED and (rows.status == "ok").all()


def test_killed_mid_federation_then_after_the_last_round_resumes_without_losing_a_row(reference):
    """Kill 1: after round 2 (the federation resumes from its checkpoint). Kill 2, of the resumed run: after the
    last round but before the last attack (only the backlog on disk is left to attack). Then resume once more."""
    tmp, ref_rounds, ref_rows = reference
    run, cmd = tmp / "killed", command(tmp, "killed")
    run_and_kill(cmd, run, lambda r, l: len(r) >= 3, "round 2 finished")
    assert len(table(run / "rounds.parquet")) < ROUNDS + 1
    run_and_kill(cmd + ["--resume"], run, lambda r, l: len(r) == ROUNDS + 1, "every round finished")
    before = table(run / "leakage.parquet")
    assert len(before) < ROUNDS * ATTACKED, "every attack had already finished: the kill point was missed"
    assert any((run / "queue").iterdir()), "the backlog was not on disk"
    checksums = list(table(run / "rounds.parquet")["model_checksum"])
    resume(cmd)
    assert list(table(run / "rounds.parquet")["model_checksum"]) == checksums  # the federation did not rerun
    check_equal(run, ref_rounds, ref_rows)


def test_resume_refuses_a_config_that_would_change_the_results(reference, monkeypatch):
    from typer.testing import CliRunner

    from fedsim.cli import app

    tmp, _, _ = reference
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, command(tmp, "reference")[3:] + ["--set", "client.lr=0.5", "--resume"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "client.lr" in lines[0], result.stderr
