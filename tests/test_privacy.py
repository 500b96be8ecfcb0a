"""Differential privacy with accounting: client_dp's noise and clipping, the epsilon column against Opacus's
RDPAccountant, target-epsilon resolution, Poisson client sampling and the victims client_dp refuses."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.config import load_config
from fedsim.defenses import DefenseContext, build_defense, clip_update, global_norm
from fedsim.privacy import Mechanism, PrivacyLedger, epsilon

SMALL = ["federation.num_clients=6", "federation.clients_per_round=2", "federation.rounds=3", "data.test_samples=50",
         "attacks=[]"]


def ctx(seed: int) -> DefenseContext:
    return DefenseContext(generator=torch.Generator().manual_seed(seed))


def test_client_dp_noise_has_the_stated_std_and_clipping_never_exceeds_clip():
    g = torch.Generator().manual_seed(0)
    update = {"w": 3.0 * torch.randn(400, 250, generator=g), "b": torch.randn(250, generator=g) + 1.0}
    dp = build_defense({"name": "client_dp", "clip": 2.0, "noise_multiplier": 0.7})
    clipped = clip_update(update, 2.0)
    assert global_norm(clipped).item() == pytest.approx(2.0, rel=1e-6)
    stds, means = [], []
    for seed in range(5):
        noisy = dp.apply(update, ctx(seed))
        noise = torch.cat([(noisy[k] - clipped[k]).flatten() for k in update])
        stds.append(noise.std().item())
        means.append(noise.mean().item())
    assert np.mean(stds) == pytest.approx(0.7 * 2.0, rel=0.05)  # noise_multiplier x clip, per coordinate
    assert abs(np.mean(means)) < 0.01
    rng = np.random.default_rng(1)
    for _ in range(200):  # any scale: the clipped norm never exceeds clip; below clip the update is unchanged
        u = {"a": torch.from_numpy(rng.normal(size=(7, 5)) * 10 ** rng.uniform(-3, 3))}
        c = clip_update(u, 1.5)
        assert global_norm(c).item() <= 1.5 * (1 + 1e-9)
        if global_norm(u).item() <= 1.5:
            assert torch.equal(c["a"], u["a"])
    same = dp.apply(update, ctx(3))
    assert all(torch.equal(same[k], dp.apply(update, ctx(3))[k]) for k in update)  # seeded per (client, round)


def test_ledger_equals_a_fresh_rdp_accountant_and_keeps_its_state():
    from opacus.accountants import RDPAccountant

    m = Mechanism("client_dp", 1.1, 0.25, 1)
    ledger = PrivacyLedger([m], 1e-5)
    reference = RDPAccountant()
    assert ledger.epsilon() == 0.0
    for r in range(1, 6):
        ledger.advance()
        reference.step(noise_multiplier=1.1, sample_rate=0.25)
        assert ledger.epsilon() == reference.get_epsilon(1e-5) == epsilon([m], r, 1e-5)
    copy = PrivacyLedger([m], 1e-5)
    copy.load_state_dict(ledger.state_dict())
    assert copy.epsilon() == ledger.epsilon() and copy.rounds == 5
    assert math.isinf(epsilon([Mechanism("x", 0.0, 0.5)], 1, 1e-5))  # clipping without noise: no guarantee


def test_a_target_epsilon_resolves_into_the_noise_multiplier_that_reaches_it():
    cfg = load_config(None, SMALL + ['defenses=[{name="client_dp", clip=1.0, epsilon=8.0}]', "privacy.delta=1e-4"])
    spec = cfg.defenses[0]
    assert spec["noise_multiplier"] > 0
    reached = epsilon(cfg.privacy_mechanisms(), cfg.federation.rounds, 1e-4)
    assert reached == pytest.approx(8.0, abs=0.05) and reached <= 8.0 + 1e-9
    assert cfg.privacy_mechanisms()[0].sample_rate == pytest.approx(2 / 6)


def test_poisson_sampling_draws_each_client_independently_at_the_stated_rate():
    from flwr.serverapp.strategy import FedAvg

    from strategies.reproducible import ReproducibleSampling

    partition_of = {100 + i: i for i in range(20)}
    strategy = ReproducibleSampling(FedAvg(), partition_of, clients_per_round=5, seed=4, poisson=True)
    counts = [len(strategy.sample(r)) for r in range(1, 2001)]
    assert np.mean(counts) == pytest.approx(5.0, rel=0.05)
    assert len(set(counts)) > 5 and min(counts) < 5 < max(counts)  # not a fixed size
    assert strategy.sample(7) == strategy.sample(7)  # reproducible per (seed, round)
    fixed = ReproducibleSampling(FedAvg(), partition_of, clients_per_round=5, seed=4)
    assert all(len(fixed.sample(r)) == 5 for r in range(1, 50))


def test_client_dp_refuses_a_batchnorm_victim_before_the_run(data_dir):
    from fedsim.federation import prepare

    cfg = load_config("experiments/quickstart.toml", SMALL + ['model.name="convnet"', "model.width=8",
                                                             'defenses=[{name="client_dp", clip=1.0, noise_multiplier=1.0}]'])
    with pytest.raises(ValueError, match=r"defenses\.0: client_dp on a victim with BatchNorm"):
        prepare(cfg)


@pytest.mark.ray
def test_the_epsilon_column_of_a_real_run_equals_the_rdp_accountant(tmp_path, data_dir):
    from opacus.accountants import RDPAccountant

    from fedsim.driver import run_federation

    cfg = load_config("experiments/quickstart.toml", SMALL + [
        f'output_dir="{tmp_path}"', 'name="dp"', 'defenses=[{name="client_dp", clip=0.5, epsilon=20.0}]',
        'federation.sampling="poisson"', "attack.clients_per_round=0", "seed=15"])
    store = run_federation(cfg, show_progress=False)
    rounds = pd.read_parquet(store.root / "rounds.parquet")
    assert list(rounds["round"]) == [0, 1, 2, 3]
    nm = cfg.defenses[0]["noise_multiplier"]
    reference = RDPAccountant()
    assert rounds["epsilon"].iloc[0] == 0.0
    for r in (1, 2, 3):
        reference.step(noise_multiplier=nm, sample_rate=2 / 6)
        assert rounds["epsilon"].iloc[r] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert rounds["epsilon"].iloc[-1] == pytest.approx(20.0, abs=0.1)
    # seed 15 samples clients [0, 5], nobody, [3]: the empty round keeps the model and still counts as a release
    checks = list(rounds["model_checksum"])
    assert checks[2] == checks[1] and len({checks[0], checks[1], checks[3]}) == 3
    # A run killed between rounds 2 and 3 (round 3's checkpoint never written) and resumed: the ledger continues
    # from the two released rounds, it does not restart (a restarted one would report one round's epsilon).
    (store.root / "checkpoints" / "round_003.pt").unlink()
    resumed = pd.read_parquet(run_federation(cfg, mode="resume", show_progress=False).root / "rounds.parquet")
    assert list(resumed["round"]) == [0, 1, 2, 3]
    assert resumed["epsilon"].iloc[3] == pytest.approx(rounds["epsilon"].iloc[3], rel=1e-12)
    assert resumed["model_checksum"].iloc[3] == checks[3]
    first = RDPAccountant()
    first.step(noise_multiplier=nm, sample_rate=2 / 6)
    assert resumed["epsilon"].iloc[3] > 1.5 * first.get_epsilon(1e-5)


def test_dp_sgd_clips_each_example_and_adds_the_stated_noise(cifar_test):
    """FedSGD on 4 images through Opacus: without noise the update is -lr x the mean of the per-example gradients,
    each clipped to ``clip``; with noise, the difference has std lr x noise_multiplier x clip / batch."""
    from fedsim.models import build_model
    from fedsim.training import TrainConfig, local_train, step_schedule

    cfg = TrainConfig(mode="fedsgd", lr=0.5, batch_size=4, num_samples=4)
    x, y = cifar_test.model_input(range(4)), cifar_test.label_tensor(range(4))
    model = build_model("lenet_zhu", 10, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    clipped = []
    for i in range(4):  # per-example gradients by hand, clipped to 0.05
        model.load_state_dict(start)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        assert norm > 0.05  # the clip binds for every example
        clipped.append({n: v * (0.05 / norm) for n, v in g.items()})
    expected = {n: -0.5 * sum(c[n] for c in clipped) / 4 for n in names}

    def dp_update(noise: float, seed: int) -> dict:
        model.load_state_dict(start)
        dp = build_defense({"name": "dp_sgd", "clip": 0.05, "noise_multiplier": noise})
        out = local_train(model, x, y, cfg, step_schedule(cfg), defenses=(dp,),
                          generator=torch.Generator().manual_seed(seed))
        return {n: out.state[n] - start[n] for n in names}

    exact = dp_update(0.0, 0)
    for n in names:
        assert torch.allclose(exact[n], expected[n], atol=1e-7, rtol=1e-4), n
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus's hooks were removed
    noisy = dp_update(2.0, 1)
    diff = torch.cat([(noisy[n] - exact[n]).flatten() for n in names])
    assert diff.std().item() == pytest.approx(0.5 * 2.0 * 0.05 / 4, rel=0.05)


@pytest.mark.ray
def test_dp_sgd_clients_train_and_report_epsilon(tmp_path, data_dir):
    from opacus.accountants import RDPAccountant

    from fedsim.driver import run_federation

    cfg = load_config("experiments/quickstart.toml", SMALL + [
        f'output_dir="{tmp_path}"', 'name="dpsgd"', 'client.mode="fedavg"', "client.batch_size=2",
        "client.num_samples=8", "client.epochs=1", "client.lr=0.05",
        'defenses=[{name="dp_sgd", clip=1.0, noise_multiplier=1.2}]', "attack.clients_per_round=1",
        'attacks=[{name="inverting_gradients", iterations=20, restarts=1}]'])
    store = run_federation(cfg, show_progress=False)
    rounds = pd.read_parquet(store.root / "rounds.parquet")
    reference = RDPAccountant()
    for r in (1, 2, 3):
        for _ in range(4):  # 8 samples in batches of 2: four noisy steps per round at sampling rate 1/4
            reference.step(noise_multiplier=1.2, sample_rate=0.25)
        assert rounds["epsilon"].iloc[r] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert rounds["model_checksum"].nunique() == 4  # the model trains
    leak = store.leakage.frame()
    assert len(leak) == 3 and (leak.status == "ok").all()  # the attacker got (and attacked) DP-SGD updates
