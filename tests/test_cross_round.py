"""Cross-round inversion: one client's updates of several rounds, inverted jointly under each round's model."""

from dataclasses import replace

import numpy as np
import torch

from attacker.attacks import inversion_problem
from attacker.engine import AttackEngine, EngineSpec, JointProblem, OptimizerSpec
from fedsim.client import client_round
from fedsim.config import build_threat
from fedsim.contract import ModelSpec, ServerView, build_attack
from fedsim.models import build_model
from fedsim.protocol import read_reply, reply_content
from fedsim.training import TrainConfig, float_state, local_train, step_schedule


def client_over_rounds(data, ids, rounds, other=(100, 101, 102, 103)):
    """The same client images under a public model that others' training moves between rounds."""
    model = build_model("lenet_zhu", 10, seed=0)
    threat = build_threat([])
    view = ServerView(ModelSpec("lenet_zhu", 10, (3, 32, 32)), (data.mean, data.std), threat)
    cfg = TrainConfig(lr=0.1, batch_size=len(ids), num_samples=len(ids))
    observed = []
    for r in range(1, rounds + 1):
        state = float_state(model)
        reply = client_round(model, state, data, np.array(ids), cfg, [], threat, seed=0, server_round=r, client_id=7)
        observed.append(view.observe(r, {k: v.numpy() for k, v in state.items()}, cfg.to_record(),
                                     read_reply(reply_content(reply, 7, state))))
        model.load_state_dict(state, strict=False)
        others = TrainConfig(lr=0.5, batch_size=4, num_samples=4)  # the rest of the federation moves the model
        local_train(model, data.model_input(list(other)), data.label_tensor(list(other)), others, step_schedule(others))
    return observed, threat, cfg


def test_the_joint_cost_is_the_sum_over_rounds_and_vanishes_at_the_true_images(cifar_test):
    ids = [0, 1]
    observed, _, cfg = client_over_rounds(cifar_test, ids, 3)
    labels = cifar_test.labels[ids]
    parts = [inversion_problem([o], cfg, [labels], "cpu") for o in observed]
    assert not np.allclose(observed[0].global_state["fc.weight"], observed[2].global_state["fc.weight"])
    spec = EngineSpec(regularizers=(), iterations=1, optimizer=OptimizerSpec(name="adam", lr=1e-12),
                      update_scale=0.1, trace_every=0)
    truth = cifar_test.model_input(ids)[None, None]
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    for start, low in ((truth, True), (noise, False)):
        joint = AttackEngine(spec).run(JointProblem(parts, [{}] * 3), start={"x": start}).losses
        single = sum(AttackEngine(spec).run(p, start={"x": start}).losses for p in parts)
        assert torch.allclose(joint, single, atol=1e-5)
        assert (joint < 1e-4).all() if low else (joint > 0.05).all(), joint


def test_cross_round_attack_uses_the_clients_history_and_keeps_it_bounded(cifar_test, tmp_path):
    observed, threat, _ = client_over_rounds(cifar_test, [3, 4], 4)
    attack = build_attack({"name": "cross_round", "rounds_used": 3, "iterations": 50})
    used = [attack.reconstruct_many([o], threat, seed=0)[0].extra["rounds"] for o in observed]
    assert used == [[1], [2, 1], [3, 2, 1], [4, 3, 2]]
    assert [k.observed.round for k in attack._history[7]] == [3, 4]  # rounds_used - 1 kept
    torch.save(attack.state_dict(), tmp_path / "state.pt")
    restored = build_attack({"name": "cross_round", "rounds_used": 3, "iterations": 50})
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [k.observed.round for k in restored._history[7]] == [3, 4]
    nxt = replace(observed[-1], round=5)
    assert restored.reconstruct_many([nxt], threat, seed=0)[0].extra["rounds"] == [5, 4, 3]
