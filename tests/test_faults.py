"""Faults injected for real: an attacker actor killed mid-attack, a hung attack, a client that raises in round 2."""

import time
from pathlib import Path

import pandas as pd
import pytest

from fedsim.config import load_config
from fedsim.contract import ThreatModel
from fedsim.driver import run_federation
from fedsim.pool import AttackerPool
from observed import updates
from strategies.reproducible import ClientFailure

pytestmark = pytest.mark.ray
class Rows:
    def __init__(self):
        self.rows = []

    def __call__(self, observed, attack, outcome):
        self.rows.append((observed.round, observed.client_id, attack, outcome))


def wait_for_starts(path: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not (path.is_file() and len(path.read_text().split()) >= count):
        assert time.time() < deadline, f"the attack did not start {count} times"
        time.sleep(0.1)


def test_an_attacker_killed_mid_attack_is_restarted_and_its_call_retried_once(outside, ray_local, tmp_path):
    starts = tmp_path / "starts.txt"
    rows = Rows()
    pool = AttackerPool([{"name": "outside_sleep", "seconds": 4, "started_file": str(starts)}], ThreatModel(), rows,
                        executor="ray", workers=1)
    pool.submit(updates(1, [0, 1]))
    wait_for_starts(starts, 1)
    ray_local.kill(pool._actors[0], no_restart=False)  # mid-attack
    pool.drain(timeout=120)
    assert len(starts.read_text().split()) == 2  # ran again on the restarted worker
    assert sorted((r, c) for r, c, _, _ in rows.rows) == [(1, 0), (1, 1)]  # once each, after the retry
    assert all(not isinstance(outcome, BaseException) for *_, outcome in rows.rows), rows.rows
    # killed again during its retry: the row becomes an error that names the death, and the pool goes on
    rows.rows.clear()
    pool.submit(updates(2, [0]))
    for count in (3, 4):
        wait_for_starts(starts, count)
        ray_local.kill(pool._actors[0], no_restart=False)
    pool.drain(timeout=120)
    ((r, c, _, outcome),) = rows.rows
    assert r == 2 and isinstance(outcome, ray_local.exceptions.RayActorError)
    assert len(starts.read_text().split()) == 4  # not retried a second time
    pool.close()


def test_an_attack_past_its_timeout_becomes_a_failed_row_and_the_worker_recovers(outside, ray_local):
    rows = Rows()
    pool = AttackerPool([{"name": "outside_sleep", "seconds": 3600}, {"name": "outside_mean"}], ThreatModel(), rows,
                        executor="ray", workers=1, timeout=3.0)
    t0 = time.monotonic()
    pool.submit(updates(1, [0]))  # the hung call, then outside_mean queued behind it on the same worker
    pool.drain(timeout=120)
    assert time.monotonic() - t0 < 60
    by_attack = {a: outcome for _, _, a, outcome in rows.rows}
    assert isinstance(by_attack["outside_sleep"], TimeoutError) and "attack.timeout=3" in str(by_attack["outside_sleep"])
    assert not isinstance(by_attack["outside_mean"], BaseException)  # resubmitted to the restarted worker
    pool.close()


def test_ray_shut_down_under_a_running_attack_writes_no_row_and_starts_no_new_ray(outside, ray_local, tmp_path,
                                                                                  monkeypatch):
    """What Ctrl-C does under ``fedsim run``: Flower's runtime shuts Ray down before the interrupt reaches fedsim. The
    attack in flight must not become an error row (``--resume`` skips updates that have a row, so it would never be
    attacked), no Ray call may follow (it would start a new Ray), and ``drain`` says why instead of waiting. The
    collector only polls Ray (timeout 0): a shutdown from another thread tears Ray's core worker down under any thread
    blocked inside it, which can kill the whole process (ray-project/ray#31145)."""
    waits = []
    real_wait = ray_local.wait

    def recorded_wait(*args, **kwargs):
        waits.append(kwargs.get("timeout"))
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(ray_local, "wait", recorded_wait)
    starts = tmp_path / "starts.txt"
    rows = Rows()
    pool = AttackerPool([{"name": "outside_sleep", "seconds": 30, "started_file": str(starts)}], ThreatModel(), rows,
                        executor="ray", workers=1)
    pool.submit(updates(1, [0]))
    wait_for_starts(starts, 1, timeout=180)
    ray_local.shutdown()
    with pytest.raises(RuntimeError, match="stay queued for --resume"):
        pool.drain(timeout=60)
    pool.submit(updates(2, [1]))  # a round teed after the shutdown: nothing is launched
    with pytest.raises(RuntimeError, match="stay queued for --resume"):
        pool.close()
    assert rows.rows == []
    assert not ray_local.is_initialized()
    assert waits and set(waits) == {0}, waits


def client_fault_config(tmp_path, name, *overrides):
    return load_config("experiments/quickstart.toml", [
        f'name="{name}"', f'output_dir="{tmp_path}"', "federation.num_clients=4", "federation.clients_per_round=4",
        "federation.rounds=3", "data.test_samples=50", "attack.clients_per_round=4",
        'attacks=[{name="outside_mean"}]', 'defenses=[{name="outside_crash", round=2, client=1}]', *overrides])


def test_a_client_that_raises_is_recorded_and_the_round_aggregates_the_others(tmp_path, data_dir, outside):
    store = run_federation(client_fault_config(tmp_path, "skip"), show_progress=False)
    rounds = store.rounds.frame()
    assert list(rounds["round"]) == [0, 1, 2, 3] and rounds["model_checksum"].nunique() == 4
    failures = pd.read_parquet(store.root / "failures.parquet")
    assert failures[["round", "client_id"]].values.tolist() == [[2, 1]]
    assert "injected fault in client 1, round 2" in failures.reason[0]
    leak = store.leakage.frame()
    assert sorted(leak[leak["round"] == 2].client_id) == [0, 2, 3]  # no row for the failed reply
    assert sorted(leak[leak["round"] == 3].client_id) == [0, 1, 2, 3]


def test_a_client_that_raises_can_stop_the_run_naming_client_and_round(tmp_path, data_dir, outside):
    cfg = client_fault_config(tmp_path, "stop", 'federation.on_client_error="stop"')
    with pytest.raises(ClientFailure, match=r"client 1 failed in round 2: .*injected fault"):
        run_federation(cfg, show_progress=False)
    assert list(pd.read_parquet(tmp_path / "stop" / "rounds.parquet")["round"]) == [0, 1]
