"""End to end on real Flower + Ray (no mocks): determinism with the tee, the attacker/ground-truth line, results."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.backlog import audit_from_record
from fedsim.config import load_config
from fedsim.contract import AuditRecord, ObservedUpdate
from fedsim.driver import run_federation

pytestmark = pytest.mark.ray


@pytest.fixture
def spy(monkeypatch):
    """The outside package's spy attack (registered by entry point, not by fedsim): what reached it."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "outside_plugin"))
    import fedsim_outside

    fedsim_outside.SEEN.clear()
    fedsim_outside.SEEDS.clear()
    return fedsim_outside.SEEN


def small_config(tmp_path, name, *overrides):
    return load_config("experiments/quickstart.toml", [
        f'name="{name}"', f'output_dir="{tmp_path}"', "federation.num_clients=4", "federation.clients_per_round=2",
        "federation.rounds=2", "attacks.0.iterations=60", "attacks.0.restarts=1", "data.test_samples=100",
        *overrides])


def test_tee_and_attacks_leave_the_global_model_bit_identical(tmp_path, reference):
    """The shared reference run (tee on, IG on 2 clients per round) against the same experiment with no attacks."""
    from reference_run import OVERRIDES, ROOT, ROUNDS

    cfg = load_config(ROOT / "experiments" / "quickstart.toml",
                      [f'output_dir="{tmp_path}"', 'name="off"', *OVERRIDES, "attacks=[]"])
    off = run_federation(cfg, show_progress=False)
    rounds_on, rounds_off = pd.read_parquet(reference / "rounds.parquet"), off.rounds.frame()
    assert list(rounds_on["round"]) == list(range(ROUNDS + 1))
    assert list(rounds_on["model_checksum"]) == list(rounds_off["model_checksum"])
    assert rounds_on["model_checksum"].nunique() == ROUNDS + 1  # the model does change every round
    assert rounds_on["epsilon"].isna().all() and rounds_off["epsilon"].isna().all()  # no DP defense, no epsilon
    leak = pd.read_parquet(reference / "leakage.parquet")
    assert sorted(leak["round"].unique()) == list(range(1, ROUNDS + 1))
    assert len(leak) == 2 * ROUNDS and (leak.status == "ok").all()
    assert np.isfinite(leak[["psnr_mean", "ssim_mean"]].to_numpy()).all()
    assert (leak.label_accuracy == 1.0).all()  # iDLG is exact for one image on LeNet(Zhu)
    assert (reference / "grids" / "round_001.png").is_file() and (reference / "config.json").is_file()
    assert not (off.root / "leakage.parquet").exists()


def carried(value, path="update"):
    """Every (path, leaf) inside a record: dataclass fields, dict keys and values, sequences, arrays."""
    from dataclasses import fields, is_dataclass

    yield path, value
    if is_dataclass(value):
        for f in fields(value):
            yield from carried(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}[{k!r}] (key)", k
            yield from carried(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)) and not all(isinstance(v, (int, float)) for v in value):
        for i, v in enumerate(value):
            yield from carried(v, f"{path}[{i}]")


def assert_no_ground_truth(record, audits: list[AuditRecord], images: list[np.ndarray]) -> None:
    """No audit record (by type), no sequence of a client's sample ids or step ids, no audit key, and no true image
    anywhere in ``record`` (an observed update, or its on-disk form)."""
    truths = [sorted(a.sample_ids) for a in audits] + [sorted(a.step_ids) for a in audits if a.step_ids]
    for path, leaf in carried(record):
        assert not isinstance(leaf, AuditRecord), path
        if isinstance(leaf, str):  # the audit record's fields, under either spelling (the wire's or the class's)
            assert not any(word in leaf for word in ("sample-id", "sample_id", "step-id", "step_id", "audit")), path
        if isinstance(leaf, (list, tuple, np.ndarray)) and len(leaf) > 1:
            flat = np.asarray(leaf).ravel()
            if np.issubdtype(flat.dtype, np.integer):
                assert sorted(flat.tolist()) not in truths, path
            if np.issubdtype(flat.dtype, np.floating):
                for image in images:
                    assert not (flat.size == image.size and np.allclose(flat, image.ravel(), atol=1e-3)), path


def test_attacks_receive_only_what_the_server_observes(tmp_path, data_dir, spy, outside):
    """On the Ray path: what reached the attacker actor, and the round's on-disk queue while the attack ran, carry
    nothing of the audit record (by type and by content) and no true image; the evaluator still scores."""

    from fedsim.federation import prepare

    seen = tmp_path / "seen"
    queue = tmp_path / "spy" / "queue"
    cfg = small_config(tmp_path, "spy", f'attacks=[{{name="outside_spy", record_to="{seen}", queue="{queue}"}}]',
                       'threat.labels="known"', "client.batch_size=2", "attack.workers=1",
                       'defenses=[{name="topk", fraction=0.5}]')
    store = run_federation(cfg, show_progress=False)
    calls = sorted(seen.iterdir())
    observed = [obs for call in calls for obs in pickle.loads((call / "observed.pkl").read_bytes())]
    assert len(observed) == 4 and not spy  # they reached the actor's process, not this one's
    fed = prepare(cfg, checks=False)
    allowed = {"round", "client_id", "model", "normalization", "global_state", "update", "train_config",
               "num_examples", "shared", "defenses"}
    for call in calls:
        on_disk = {p.name: torch.load(p, weights_only=True) for p in sorted((call / "queue").glob("observed_*.pt"))}
        audits = [audit_from_record(torch.load(p, weights_only=True)) for p in sorted((call / "queue").glob("audit_*.pt"))]
        assert len(on_disk) == 2 and len(audits) == 2  # the round's two attacked clients, both on disk
        images = [fed.train.model_input(list(a.sample_ids)).numpy() for a in audits]
        images += [fed.train.unit_tensor(list(a.sample_ids)).numpy() for a in audits]
        for name, record in on_disk.items():
            assert_no_ground_truth(record, audits, images)
        for obs in pickle.loads((call / "observed.pkl").read_bytes()):
            assert isinstance(obs, ObservedUpdate) and set(vars(obs)) == allowed
            assert_no_ground_truth(obs, audits, images)
    for obs in observed:
        assert set(obs.shared) == {"labels"}  # known labels are shared (as a sorted multiset), nothing else
        assert obs.shared["labels"] == sorted(obs.shared["labels"])
        assert set(obs.train_config) == {"mode", "lr", "epochs", "batch_size", "num_samples", "shuffle", "bn_mode"}
        assert obs.defenses == ("topk(fraction=0.5)",)
        # the observed update is the defended one: half of each layer is zero
        w = obs.update["fc.weight"]
        assert (w == 0).mean() == pytest.approx(0.5, abs=0.01)
    # ...while the evaluator did get the ground truth: rows carry label accuracy from the audit record
    leak = store.leakage.frame()
    assert (leak.status == "ok").all() and len(leak) == 4


def test_shared_batchnorm_statistics_reach_the_attacker_through_flower(tmp_path, data_dir, spy):
    SEEN = spy
    cfg = small_config(tmp_path, "bn", 'attacks=[{name="outside_spy"}]', 'attack.executor="inline"',
                       'model.name="convnet"', "model.width=4", "client.batch_size=2",
                       'defenses=[{name="share_bn_stats"}]', "federation.rounds=1")
    run_federation(cfg, show_progress=False)
    assert len(SEEN) == 2
    from fedsim.models import build_model

    bn_layers = [n for n, m in build_model("convnet", 10, width=4).named_modules() if "BatchNorm" in type(m).__name__]
    for obs in SEEN:
        stats = obs.shared["bn_stats"]
        assert list(stats) == bn_layers
        mean, var = stats[bn_layers[0]]
        assert mean.shape == (4,) and var.shape == (4,) and (var >= 0).all()
    # without the defense the same threat switch shares nothing
    SEEN.clear()
    run_federation(small_config(tmp_path, "nobn", 'attacks=[{name="outside_spy"}]', 'attack.executor="inline"',
                                'model.name="convnet"', "model.width=4", "federation.rounds=1"), show_progress=False)
    assert all("bn_stats" not in obs.shared for obs in SEEN)


def test_the_attack_chain_replays_a_real_fedavg_client_to_float_precision(tmp_path, data_dir, spy):
    """An observed update of round 2 (seed 5, BatchNorm victim, FedAvg with 4 local steps, shared BN statistics)
    is matched to float precision by the client replay the attacker builds from it (public model loaded strictly,
    the sent training config, the simulator), fed with the true images in their true order."""
    import torch

    from attacker.attacks import attacker_train_config, inversion_problem
    from fedsim.client import choose_samples
    from fedsim.federation import prepare
    from fedsim.models import build_model
    from fedsim.training import load_public_state

    SEEN = spy
    cfg = small_config(tmp_path, "chain", 'attacks=[{name="outside_spy"}]', 'attack.executor="inline"', "seed=5",
                       'model.name="convnet"', "model.width=4", 'client.mode="fedavg"', "client.epochs=2",
                       "client.batch_size=2", "client.num_samples=4", "client.lr=0.05",
                       'defenses=[{name="share_bn_stats"}]')
    run_federation(cfg, show_progress=False)
    fed, threat = prepare(cfg), cfg.threat_model()
    late = [obs for obs in SEEN if obs.round == 2]
    assert len(late) == 2
    for obs in late:
        ids = choose_samples(fed.partitions[obs.client_id], 4, cfg.seed, obs.round, obs.client_id)
        x, y = fed.train.model_input(ids), fed.train.label_tensor(ids)
        problem = inversion_problem([obs], attacker_train_config(obs, threat), [y.numpy()], "cpu")
        assert len(problem.simulator.schedule) == 4  # 2 epochs x 2 mini-batches, replayed step by step
        simulated = problem.simulator.update(x, y)
        for key, target in problem.targets.items():
            torch.testing.assert_close(simulated[key].detach(), target[0], rtol=1e-4, atol=1e-6, msg=key)
        # the shared BN statistics are the client's true first-step batch statistics under the public model
        model = build_model("convnet", 10, width=4, seed=123)  # another init: a partial load would show
        load_public_state(model, {k: torch.from_numpy(v.copy()) for k, v in obs.global_state.items()})
        true_stats, hooks = {}, []

        def record(name):
            def hook(_module, inputs):
                true_stats[name] = (inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3), unbiased=False))
            return hook

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                hooks.append(module.register_forward_pre_hook(record(name)))
        model.train()
        model(x[:2])  # the first local step's mini-batch
        for h in hooks:
            h.remove()
        assert list(obs.shared["bn_stats"]) == list(true_stats)
        for name, (mean, var) in true_stats.items():
            shared_mean, shared_var = obs.shared["bn_stats"][name]
            np.testing.assert_allclose(shared_mean, mean.detach().numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(shared_var, var.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):  # a wrong public model is refused, never half-loaded
        load_public_state(build_model("convnet", 10, width=8), {k: torch.from_numpy(v.copy())
                                                               for k, v in late[0].global_state.items()})
    # The seed each attack call received: the attacker's stream (its root on its own branch of the run seed, then
    # the round and the attack), never the run seed nor any seed a client drew its samples, order or noise from.
    import fedsim_outside

    from fedsim.seeds import attack_seed, attacker_root, round_seed

    root = attacker_root(cfg.seed, cfg.attack.seed)
    client_seeds = {round_seed(cfg.seed, r, c, purpose) for r in range(cfg.federation.rounds + 1)
                    for c in range(cfg.federation.num_clients) for purpose in range(4)}
    assert sorted({r for r, _ in fedsim_outside.SEEDS}) == list(range(1, cfg.federation.rounds + 1))
    for server_round, seed in fedsim_outside.SEEDS:
        assert seed == attack_seed(root, server_round, 0)
        assert seed not in client_seeds and seed != cfg.seed and root not in client_seeds


def test_secure_aggregation_shows_the_tee_only_the_exact_aggregate_and_leaves_fedavg_unchanged(tmp_path, data_dir, spy):
    from fedsim.client import choose_samples, client_round
    from fedsim.clientapp import ClientSide, _client_process_state
    from fedsim.federation import prepare
    from strategies.reproducible import ReproducibleSampling

    SEEN = spy
    common = ['attack.executor="inline"', "client.batch_size=2", "seed=4"]
    cfg = small_config(tmp_path, "secagg", 'attacks=[{name="outside_spy"}]', "threat.secure_aggregation=true",
                       *common)
    store = run_federation(cfg, show_progress=False)
    plain = run_federation(small_config(tmp_path, "plain", "attacks=[]", *common), show_progress=False)
    assert list(store.rounds.frame()["model_checksum"]) == list(plain.rounds.frame()["model_checksum"])
    rows = store.leakage.frame()
    assert list(rows["client_id"]) == [-1, -1] and list(rows["round"]) == [1, 2]  # no per-client rows
    assert (rows.batch_size == 4).all() and (rows.status == "ok").all()  # the union of the two clients' batches
    assert len(SEEN) == 2 and all(o.client_id == -1 and o.num_examples == 4 and o.shared == {} for o in SEEN)
    # the observed update is exactly the example-weighted mean of the sampled clients' true updates
    side = ClientSide.of(prepare(cfg))
    data, model, defenses = _client_process_state(side.plan)
    sampler = ReproducibleSampling(None, {i: i for i in range(4)}, 2, cfg.seed)
    train, threat = cfg.client.train_config(), cfg.threat_model()
    for obs in SEEN:
        start = {k: torch.from_numpy(v) for k, v in store.checkpoints.load(obs.round - 1).items()}
        states = []
        for pid in sampler.sample(obs.round):
            ids = choose_samples(side.partitions[pid], train.num_samples, cfg.seed, obs.round, pid)
            reply = client_round(model, {k: v.clone() for k, v in start.items()}, data, ids, train, defenses, threat,
                                 seed=cfg.seed, server_round=obs.round, client_id=pid)
            states.append({k: v.numpy() for k, v in reply.state.items()})
        for key, value in obs.update.items():
            mean = states[0][key] * 0.5 + states[1][key] * 0.5
            assert np.allclose(value, mean - start[key].numpy(), atol=1e-7, rtol=0), key
