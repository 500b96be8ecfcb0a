"""Stateful attacks: one owner per state, saved every round, restored on resume and when Ray restarts a worker."""

import time

import pytest
import torch

from fedsim.contract import ThreatModel
from fedsim.pool import AttackerPool, owner
from fedsim.seeds import attack_seed
from observed import updates


class Rows:
    def __init__(self):
        self.rows = []

    def __call__(self, observed, attack, outcome):
        assert not isinstance(outcome, BaseException), outcome
        self.rows.append((observed.round, observed.client_id, attack, {**outcome.extra, **outcome.columns}))


def test_state_is_saved_every_round_and_restored_on_resume(tmp_path, outside):
    rows = Rows()
    specs = [{"name": "outside_counter"}, {"name": "outside_mean"}]
    pool = AttackerPool(specs, ThreatModel(), rows, executor="inline", state_dir=tmp_path, seed_root=12345)
    for r, clients in ((1, [0, 3]), (2, [1]), (3, [2, 4, 5])):
        pool.submit(updates(r, clients))
    folder = tmp_path / "outside_counter"
    assert sorted(p.name for p in folder.iterdir()) == ["round_001.pt", "round_002.pt", "round_003.pt"]
    assert not (tmp_path / "outside_mean").exists()  # stateless: nothing saved
    state = torch.load(folder / "round_002.pt", weights_only=True)
    assert state["round"] == 2 and int(state["state"]["updates"]) == 3 and state["state"]["rounds"] == [1, 2]
    counter = [extra for (r, c, a, extra) in rows.rows if a == "outside_counter"]
    assert [e["prior_meta_steps"] for e in counter] == [0, 0, 2, 3, 3, 3]  # state grows across rounds
    assert {e["seed"] for e in counter} == {attack_seed(12345, r, 0) for r in (1, 2, 3)}

    resumed = AttackerPool(specs, ThreatModel(), rows, executor="inline", state_dir=tmp_path, seed_root=12345)
    assert resumed._inline.restored == {"outside_counter": 3}
    rows.rows.clear()
    resumed.submit(updates(4, [7]))
    (extra,) = [e for (_, _, a, e) in rows.rows if a == "outside_counter"]
    assert extra["prior_meta_steps"] == 6 and extra["prior_round"] == 3


def test_a_global_state_has_one_owner_and_a_client_history_shards(outside):
    counter, mean = outside.CountingAttack, outside.MeanImage
    assert {owner(counter, 1, c, 3) for c in range(20)} == {1}
    assert [owner(mean, 0, c, 3) for c in range(6)] == [0, 1, 2, 0, 1, 2]  # one attack: spread over workers
    assert {owner(mean, 4, c, 3, attacks=5) for c in range(6)} == {1}  # as many attacks as workers: batched whole


@pytest.mark.ray
def test_a_killed_worker_restarts_with_its_saved_state(tmp_path, outside, ray_local):
    ray = ray_local
    rows = Rows()
    pool = AttackerPool([{"name": "outside_counter"}], ThreatModel(), rows, executor="ray", workers=2,
                        state_dir=tmp_path / "attacker", seed_root=7)
    pool.submit(updates(1, [0, 1, 2]))
    pool.submit(updates(2, [3]))
    pool.drain(timeout=120)
    actor = pool._actors[owner(outside.CountingAttack, 0, 0, 2)]
    assert ray.get(actor.ping.remote()) == {}  # started fresh
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 60
    restored = {}
    while not restored:  # the kill is asynchronous; Ray then restarts the actor, whose __init__ reloads the state
        try:
            restored = ray.get(actor.ping.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        if not restored:
            assert time.time() < deadline, "the killed worker did not come back with its saved state"
            time.sleep(0.5)
    assert restored == {"outside_counter": 2}
    rows.rows.clear()
    pool.submit(updates(3, [5]))
    pool.drain(timeout=120)
    pool.close()
    ((r, _, _, extra),) = rows.rows
    assert r == 3 and extra["prior_meta_steps"] == 4 and extra["prior_round"] == 2

