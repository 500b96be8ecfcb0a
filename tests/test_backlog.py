"""The on-disk queue and model checkpoints that resume relies on: exact round trips through weights_only files."""

import numpy as np
import pytest

from fedsim.backlog import ModelCheckpoints, UpdateQueue
from fedsim.contract import AuditRecord, ModelSpec, ObservedUpdate


def observed(server_round: int, client: int) -> ObservedUpdate:
    rng = np.random.default_rng([server_round, client])
    return ObservedUpdate(
        round=server_round, client_id=client, model=ModelSpec("convnet", 10, (3, 32, 32), 4, "sigmoid"),
        normalization=((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
        global_state={"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
        update={"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
        train_config={"mode": "fedavg", "lr": 0.05, "epochs": 2, "shuffle": False},
        num_examples=4, shared={"labels": [1, 1, 7, 9], "bn_stats": {"bn1": (np.ones(4, np.float32),
                                                                            np.full(4, 2.0, np.float32))}},
        defenses=("share_bn_stats()",))


def test_an_observed_update_and_its_audit_round_trip_exactly(tmp_path):
    queue = UpdateQueue(tmp_path / "queue")
    sent = [observed(3, 5), observed(3, 0)]
    for obs in sent:
        queue.put(obs)
        queue.put_audit(AuditRecord(3, obs.client_id, (10, 11, 12, 13), (11, 10, 13, 12)))
    assert queue.rounds() == [3]
    back = queue.observed(3)
    assert [o.client_id for o in back] == [0, 5]  # in client order
    for got, want in zip(back, sorted(sent, key=lambda o: o.client_id)):
        assert got.model == want.model and got.normalization == want.normalization
        assert got.train_config == want.train_config and got.defenses == want.defenses
        assert got.shared["labels"] == want.shared["labels"]
        np.testing.assert_array_equal(got.update["conv.weight"], want.update["conv.weight"])
        np.testing.assert_array_equal(got.global_state["conv.weight"], want.global_state["conv.weight"])
        np.testing.assert_array_equal(got.shared["bn_stats"]["bn1"][1], want.shared["bn_stats"]["bn1"][1])
    assert queue.audits(3)[0] == AuditRecord(3, 0, (10, 11, 12, 13), (11, 10, 13, 12))
    # a Flower app's client records its batches: the images travel with the audit (and only with it)
    images = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    queue.put_audit(AuditRecord(3, 7, (0, 1), (1, 0, 1), images=images, labels=np.array([4, 2])))
    recorded = queue.audits(3)[-1]
    assert recorded == AuditRecord(3, 7, (0, 1), (1, 0, 1)) and recorded.recorded
    np.testing.assert_array_equal(recorded.images, images)
    np.testing.assert_array_equal(recorded.labels, [4, 2])
    assert queue.audits(3)[0].images is None
    queue.drop(3)
    assert queue.rounds() == []


def test_checkpoints_keep_rounds_and_drop_unfinished_ones(tmp_path):
    store = ModelCheckpoints(tmp_path)
    arrays = {r: {"w": np.full(3, float(r), np.float32)} for r in range(4)}
    for r, a in arrays.items():
        store.save(r, a)
    store.drop_after(1)
    assert store.rounds() == [0, 1]
    np.testing.assert_array_equal(store.load(1)["w"], arrays[1]["w"])
    with pytest.raises(FileNotFoundError):
        store.load(2)


def test_an_update_kept_in_an_attacks_state_round_trips_like_the_queue(tmp_path):
    """GIML's task buffer and the cross-round history keep observed updates with the backlog's serialisation:
    every field, the shared extras included, survives a weights_only save and load."""
    import torch

    from attacker.history import Kept, pack, unpack
    from fedsim.training import TrainConfig

    want = observed(4, 2)
    torch.save(pack(Kept(want, np.array([1, 7]), TrainConfig(lr=0.05, epochs=2))), tmp_path / "kept.pt")
    got = unpack(torch.load(tmp_path / "kept.pt", weights_only=True))
    assert got.config == TrainConfig(lr=0.05, epochs=2) and got.labels.tolist() == [1, 7]
    obs = got.observed
    for key in ("round", "client_id", "model", "normalization", "train_config", "num_examples", "defenses"):
        assert getattr(obs, key) == getattr(want, key), key
    assert obs.shared["labels"] == want.shared["labels"]
    np.testing.assert_array_equal(obs.shared["bn_stats"]["bn1"][1], want.shared["bn_stats"]["bn1"][1])
    np.testing.assert_array_equal(obs.update["conv.weight"], want.update["conv.weight"])
    np.testing.assert_array_equal(obs.global_state["conv.weight"], want.global_state["conv.weight"])
    with pytest.raises(ValueError, match="earlier fedsim"):
        unpack({"round": 4, "labels": torch.tensor([1]), "config": {}})
