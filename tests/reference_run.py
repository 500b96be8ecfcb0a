"""One small federation run through the ``fedsim run`` CLI, shared by the resume and ``flwr run`` tests."""

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
ROUNDS, ATTACKED = 4, 2
OVERRIDES = ["seed=3", "federation.num_clients=4", "federation.clients_per_round=2", f"federation.rounds={ROUNDS}",
             "data.test_samples=50", f"attack.clients_per_round={ATTACKED}", "attacks.0.iterations=300",
             "attacks.0.restarts=1"]


def command(tmp_path: Path, name: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.toml", "--quiet"]
    for o in [f'output_dir="{tmp_path}"', f'name="{name}"', *OVERRIDES]:
        cmd += ["--set", o]
    return cmd


def table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError):
        return pd.DataFrame()


def keyed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.set_index(["round", "client_id", "attack"]).sort_index()


def assert_same_results(run: Path, reference: Path) -> None:
    """Same model checksum per round, each (round, client, attack) row once, the same leakage numbers."""
    rounds, rows = table(run / "rounds.parquet"), table(run / "leakage.parquet")
    ref_rounds, ref_rows = table(reference / "rounds.parquet"), table(reference / "leakage.parquet")
    assert list(rounds["round"]) == list(range(ROUNDS + 1))
    assert list(rounds["model_checksum"]) == list(ref_rounds["model_checksum"])
    assert not rows.duplicated(["round", "client_id", "attack"]).any(), "a row was written twice"
    shown = rows[["round", "client_id", "attack", "status"]].to_string() if len(rows) else "no rows"
    assert len(rows) == ROUNDS * ATTACKED and (rows.status == "ok").all(), shown
    ours, theirs = keyed(rows), keyed(ref_rows)
    assert list(ours.index) == list(theirs.index)
    for column in ("psnr_mean", "ssim_mean", "label_accuracy", "matching_loss"):
        assert (ours[column] - theirs[column]).abs().max() < 1e-4, column
