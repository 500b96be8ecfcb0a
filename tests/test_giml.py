"""GIML: the meta-update, the saved prior state, and a killed run that resumes from its last prior."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attacker.giml import GIML
from fedsim.client import client_round
from fedsim.config import build_threat
from fedsim.contract import ModelSpec, ServerView
from fedsim.models import build_model
from fedsim.protocol import read_reply, reply_content
from fedsim.training import TrainConfig, float_state

ROOT = Path(__file__).resolve().parents[1]


def observed_updates(data, server_round, ids, seed=0):
    """Real client updates of LeNet(Zhu) on ``ids`` (one image each), as the server observes them."""
    model = build_model("lenet_zhu", 10, seed=seed + server_round)
    state = float_state(model)
    threat = build_threat([])
    view = ServerView(ModelSpec("lenet_zhu", 10, (3, 32, 32)), (data.mean, data.std), threat)
    cfg = TrainConfig(lr=0.1)
    out = []
    for i in ids:
        reply = client_round(model, state, data, np.array([i]), cfg, [], threat, seed=seed, server_round=server_round,
                             client_id=i)
        out.append(view.observe(server_round, {k: v.numpy() for k, v in state.items()}, cfg.to_record(),
                                read_reply(reply_content(reply, i, state))))
    return out, threat


def small_giml(**kw):
    return GIML(attack="gi_w", iterations=20, restarts=1, meta_steps=1, tasks_per_step=3, task_latent_iterations=5,
                task_weight_steps=4, task_weight_lr=1e-2, generator_params={"ngf": 8}, meta_lr=0.3, samples=8, **kw)


def test_the_meta_update_moves_the_prior_by_exactly_beta_toward_the_adapted_weights(cifar_test, tmp_path):
    giml = small_giml()
    observed, threat = observed_updates(cifar_test, 1, [0, 1])
    observed2, _ = observed_updates(cifar_test, 2, [2])
    recs = giml.reconstruct_many(observed, threat, seed=0) + giml.reconstruct_many(observed2, threat, seed=1)
    assert [r.columns["prior_meta_steps"] for r in recs] == [0, 0, 0] and len(giml._tasks) == 3
    before = {k: v.detach().clone() for k, v in giml._prior.named_parameters()}
    adapted = giml.adapt(giml._tasks, "cpu", seed=0)  # tasks of two rounds: two public models, one joint search
    assert set(adapted) == set(before)
    moved = sum(float((adapted[k] - before[k]).abs().sum()) for k in before)
    assert moved > 0  # tau weight-search steps changed the weights
    giml.meta_update(adapted)
    for name, param in giml._prior.named_parameters():
        expected = (1 - 0.3) * before[name] + 0.3 * adapted[name]
        assert torch.allclose(param, expected, atol=1e-7), name
    # end_round: meta-steps, then the prior checkpoint and its sample grid
    giml.end_round(2, seed=5, folder=tmp_path)
    assert giml._counts == {"meta_steps": 1, "prior_round": 2}
    assert (tmp_path / "prior_round_002.pt").is_file() and (tmp_path / "samples_round_002.png").is_file()


def test_the_prior_state_round_trips_through_a_weights_only_file(cifar_test, tmp_path):
    giml = small_giml()
    observed, threat = observed_updates(cifar_test, 1, [3, 4])
    giml.reconstruct_many(observed, threat, seed=0)
    giml.end_round(1, seed=3)
    torch.save(giml.state_dict(), tmp_path / "state.pt")
    restored = small_giml()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for (name, a), (_, b) in zip(giml._prior.state_dict().items(), restored._prior.state_dict().items()):
        assert torch.equal(a, b), name
    assert restored._counts == giml._counts and len(restored._tasks) == 2
    for a, b in zip(giml._tasks, restored._tasks):
        assert a.observed.round == b.observed.round and a.observed.client_id == b.observed.client_id
        assert a.config == b.config and a.observed.model == b.observed.model
        assert np.array_equal(a.labels, b.labels)
        assert all(np.array_equal(a.observed.update[k], b.observed.update[k]) for k in a.observed.update)
    # continuing from the restored state is the same as continuing the original
    giml.end_round(2, seed=9)
    restored.end_round(2, seed=9)
    for (name, a), (_, b) in zip(giml._prior.state_dict().items(), restored._prior.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.ray
def test_a_killed_giml_run_resumes_from_its_last_prior_checkpoint(tmp_path, data_dir):
    overrides = [f'output_dir="{tmp_path}"', 'name="giml"', "federation.num_clients=4", "federation.clients_per_round=2",
                 "federation.rounds=30", "data.test_samples=50", 'attack.executor="inline"',
                 'attacks=[{name="giml", attack="gi_w", iterations=20, restarts=1, meta_steps=1, tasks_per_step=2, '
                 'task_latent_iterations=5, task_weight_steps=2, generator_params={ngf=8}, samples=4}]']
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.toml", "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    state = tmp_path / "giml" / "attacker" / "giml"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not (state / "round_002.pt").exists():
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"no second prior checkpoint: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = max(int(p.stem.split("_")[1]) for p in state.glob("round_*.pt"))
    assert 2 <= saved < 30
    expected_steps = int(torch.load(state / f"round_{saved:03d}.pt", weights_only=True)["state"]["counts"]["meta_steps"])
    assert expected_steps == saved  # one meta-step per round
    # Resume and run one round beyond the prior's last checkpoint (the federation continues from its own last
    # finished round, saved - 1 or saved: the attack of a round precedes its model checkpoint).
    resumed = subprocess.run(cmd + ["--set", f"federation.rounds={saved + 1}", "--resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = pd.read_parquet(tmp_path / "giml" / "leakage.parquet")
    assert not rows.duplicated(["round", "client_id", "attack"]).any()
    assert sorted(rows["round"].unique()) == list(range(1, saved + 2))
    after = rows[rows["round"] == saved + 1]  # attacked with the restored prior
    assert len(after) == 2
    assert (after.prior_meta_steps == expected_steps).all() and (after.prior_round == saved).all(), after
    # the report shows the prior's samples (at most 12 rounds, evenly spaced, the first and the last among them)
    from fedsim.report import build_report

    samples = sorted(state.glob("samples_round_*.png"))
    page = build_report(tmp_path / "giml").read_text()
    shown = page.count('<figure class="prior">')
    assert len(samples) >= saved and shown == min(len(samples), 12)
    assert f"after round {len(samples)}<" in page and "after round 1<" in page


def test_meta_learning_on_observed_updates_lowers_the_matching_loss_on_held_back_updates(cifar_test):
    """GIML learns: ten meta-steps on the updates of eight images (4 tasks a step) make the prior a better search
    space for updates it never saw. On four held-back images, GI-z from the meta-learned prior reaches a lower
    update-matching loss, at the same budget and from the same latent starts, than from the untrained generator
    (measured: 0.63x of the untrained loss on three held-back sets, each task lower; mean PSNR +0.6 dB)."""
    from attacker.attacks import attacker_labels, attacker_train_config, public_model
    from attacker.history import Kept
    from fedsim.metrics import score

    torch.manual_seed(0)
    train, threat = observed_updates(cifar_test, 1, list(range(8)))
    held_ids = [100, 101, 102, 103]
    held, _ = observed_updates(cifar_test, 1, held_ids)
    giml = GIML(attack="gi_z", iterations=100, restarts=1, lr=0.1, meta_steps=10, tasks_per_step=4,
                task_latent_iterations=50, task_weight_steps=10, task_weight_lr=1e-3, generator_params={"ngf": 8},
                meta_lr=0.5, samples=0)
    giml.prior_generator(held[0].model.image_shape)

    def attack_held_back():  # the inner attack keeps no task: the held-back updates never reach the meta-learning
        recs = giml.inner_attack().reconstruct_many(held, threat, seed=7)
        truth = cifar_test.unit_tensor(held_ids)
        psnr = [float(score(torch.from_numpy(np.array(r.images, dtype=np.float32)), truth[i:i + 1], r.labels,
                            cifar_test.labels[[held_ids[i]]]).psnr.mean()) for i, r in enumerate(recs)]
        return np.array([r.loss for r in recs]), np.array(psnr)

    loss_before, psnr_before = attack_held_back()
    for obs in train:  # the tasks the attacker keeps from the updates it attacked
        cfg = attacker_train_config(obs, threat)
        labels, _ = attacker_labels(obs, threat, cfg, public_model(obs))
        giml._tasks.append(Kept(obs, np.asarray(labels), cfg))
    giml.end_round(1, seed=0)
    assert giml._counts["meta_steps"] == 10
    loss_after, psnr_after = attack_held_back()
    assert loss_after.mean() < 0.85 * loss_before.mean(), (loss_before, loss_after)
    assert (loss_after < loss_before).sum() >= 3, (loss_before, loss_after)
    assert psnr_after.mean() > psnr_before.mean() + 0.2, (psnr_before, psnr_after)
