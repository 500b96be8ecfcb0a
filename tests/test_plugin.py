"""The attacker is a plugin: fedsim imports none of it, outside attacks register by entry point, one observed view."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = Path(__file__).parent / "outside_plugin"  # a package with a dist-info, as pip would install it


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_fedsim_imports_no_attacker_module():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "attacker")
                 for p in (ROOT / "fedsim").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    # ...and at run time: the whole platform imports without loading the plugin
    code = ("import sys, fedsim.cli, fedsim.federation, fedsim.single, fedsim.experiment, fedsim.pool, "
            "strategies.honest_but_curious; print(sorted(m for m in sys.modules if m.split('.')[0] == 'attacker'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_attacker_plugin_is_found_by_entry_points():
    from importlib.metadata import entry_points

    from fedsim.contract import ATTACKS, LABEL_METHODS

    names = {ep.name for ep in entry_points(group="fedsim.attacks")}
    assert {"inverting_gradients", "dlg", "gradinversion", "analytic"} <= names
    assert {"idlg", "yin", "count", "auto"} <= set(LABEL_METHODS.names())
    assert ATTACKS["inverting_gradients"].__module__ == "attacker.attacks"


def fedsim_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_an_outside_attack_runs_from_the_command_line_with_hand_checked_psnr(tmp_path, data_dir):
    env = {"PYTHONPATH": str(OUTSIDE)}
    npz = data_dir / "cifar10_test_0-199.npz"
    out = tmp_path / "outside"
    result = fedsim_cli("attack", "--attack", "outside_mean", "--param", "level=0.25", "--dataset", str(npz),
                        "--indices", "0-3", "--batch-size", "2", "--output", str(out), env=env)
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out / "leakage.parquet")
    assert list(frame.attack) == ["outside_mean"] * 2 and (frame.status == "ok").all()
    images = np.load(npz)["images"][:4].astype(np.float64) / 255.0
    for row, batch in zip(frame.itertuples(), (images[:2], images[2:])):
        expected = [10 * np.log10(1.0 / ((img - 0.25) ** 2).mean()) for img in batch]
        assert row.psnr_mean == pytest.approx(np.mean(expected), abs=1e-3)
        assert row.psnr_best == pytest.approx(max(expected), abs=1e-3)
    # its parameters are validated through the same registry: one line naming the key
    bad = fedsim_cli("attack", "--attack", "outside_mean", "--param", "level=2", "--dataset", str(npz),
                     "--output", str(tmp_path / "bad"), env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "level" in bad.stderr, bad.stderr
    unknown = fedsim_cli("attack", "--attack", "outside_mean", "--dataset", str(npz), "--output", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "unknown attack 'outside_mean'" in unknown.stderr  # not installed there
    # an attack that raises: its rows say why, and the command fails with that one line (not exit 0, no traceback)
    broken = fedsim_cli("attack", "--attack", "outside_fail", "--dataset", str(npz), "--indices", "0-1",
                        "--output", str(tmp_path / "fail"), env=env)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert "2 of 2 updates failed: RuntimeError: deliberate failure in outside_fail" in broken.stderr
    assert list(pd.read_parquet(tmp_path / "fail" / "leakage.parquet").status) == ["error", "error"]


def test_one_observed_view_for_the_tee_and_the_single_update_path(tmp_path, data_dir, monkeypatch):
    """The same client reply gives the same ObservedUpdate through a federation's auditor (the exchange the
    honest-but-curious strategy passes it: the records sent and the records received) and `fedsim attack`."""
    monkeypatch.syspath_prepend(str(OUTSIDE))
    import fedsim_outside

    from fedsim.audit import AuditPlan, Auditor, PoolSettings
    from fedsim.client import client_round
    from fedsim.config import build_threat
    from fedsim.contract import ModelSpec, ServerView, build_attack
    from fedsim.data import load_dataset
    from fedsim.defenses import build_defense
    from fedsim.models import build_model
    from fedsim.protocol import Exchange, reply_content
    from fedsim.results import RunDirectory
    from fedsim.single import SingleUpdateJob, run_single
    from fedsim.training import TrainConfig, float_state

    data = load_dataset("cifar10", "test")
    defenses = [build_defense({"name": "share_bn_stats"}), build_defense({"name": "topk", "fraction": 0.5})]
    threat = build_threat(defenses, labels="known")
    assert threat.bn_stats_shared  # derived from the pipeline
    train = TrainConfig(mode="fedavg", lr=0.05, epochs=2, batch_size=2, num_samples=4)
    fedsim_outside.SEEN.clear()
    job = SingleUpdateJob(data, "convnet", [4, 5, 6, 7], 4, build_attack({"name": "outside_spy"}), train,
                          defenses=defenses, threat=threat, width=4, seed=3)
    run_single(job, tmp_path / "single")
    (single,) = fedsim_outside.SEEN

    model = build_model("convnet", 10, width=4, seed=3)
    global_state = float_state(model)
    reply = client_round(model, global_state, data, np.array([4, 5, 6, 7]), train, defenses, threat, seed=3,
                         server_round=0, client_id=4)  # fedsim attack names a batch's client by its first image
    view = ServerView(ModelSpec("convnet", 10, (3, 32, 32), 4), (data.mean, data.std), threat,
                      tuple(d.tag() for d in defenses))
    plan = AuditPlan(view, ({"name": "outside_spy"},), attacker_seed=1, attacked_per_round=1,
                     pool=PoolSettings(executor="inline", workers=1))
    store = RunDirectory(tmp_path / "federated")
    audits = []

    def ground_truth(ids):  # the evaluator's source of true samples: record what it was asked for
        audits.append(tuple(ids))
        return data.unit_tensor(ids), data.labels[ids]

    auditor = Auditor(plan, store, ground_truth)
    sent = RecordDict({"arrays": ArrayRecord(global_state),  # the records a server sends and receives
                       "config": ConfigRecord({**train.to_record(), "server-round": 0})})
    fedsim_outside.SEEN.clear()
    (teed,) = auditor.observe(0, [Exchange(sent, reply_content(reply, 4, global_state))])
    auditor.close()
    store.close()
    (federated,) = fedsim_outside.SEEN
    assert teed is federated
    assert [r["status"] for r in store.leakage.rows] == ["ok"]

    assert set(vars(single)) == set(vars(federated))
    for key in ("round", "client_id", "model", "normalization", "train_config", "num_examples", "defenses"):
        assert getattr(single, key) == getattr(federated, key), key
    assert single.update.keys() == federated.update.keys()
    for key in single.update:
        assert np.array_equal(single.update[key], federated.update[key]), key
        assert np.array_equal(single.global_state[key], federated.global_state[key]), key
    assert single.shared.keys() == federated.shared.keys() == {"labels", "bn_stats"}
    assert single.shared["labels"] == federated.shared["labels"] == sorted(data.labels[4:8].tolist())
    for layer, (mean, var) in single.shared["bn_stats"].items():
        assert np.array_equal(mean, federated.shared["bn_stats"][layer][0])
        assert np.array_equal(var, federated.shared["bn_stats"][layer][1])
    # the shared statistics are the client's true first-step batch statistics
    first = data.model_input([4, 5])
    conv = model.features[0]
    with torch.no_grad():
        model.load_state_dict(global_state, strict=False)
        h = conv(first)
    mean, var = single.shared["bn_stats"]["features.1"]
    assert np.allclose(mean, h.mean((0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(var, h.var((0, 2, 3), unbiased=False).numpy(), atol=1e-5)
    assert audits == [(4, 5, 6, 7)]  # the evaluator fetched the client's true samples, and only the evaluator


def test_the_attacker_seed_stream_is_not_the_clients():
    from fedsim.seeds import attack_seed, attacker_root, round_seed

    for seed, other in ((0, None), (1, None), (42, None), (0, 1), (0, 7)):  # other: attack.seed
        root = attacker_root(seed, other)
        assert (root == attacker_root(seed)) == (other is None)
        attack_seeds = {attack_seed(root, r, a) for r in range(20) for a in range(3)}
        client_seeds = {round_seed(seed, r, c, s) for r in range(20) for c in range(10) for s in range(3)}
        assert len(attack_seeds) == 60 and not attack_seeds & client_seeds and seed not in attack_seeds
        assert root not in client_seeds and root != seed
    # what attacks actually receive in a federation: test_federation.py (the attack chain replay)


def test_a_defense_defined_outside_fedsim_loads_from_a_config(outside):
    """The README's example (tests/outside_plugin: update_dropout), found through the fedsim.defenses entry point."""
    from fedsim.config import load_config
    from fedsim.defenses import DefenseContext

    cfg = load_config(None, ['defenses=[{name="update_dropout", p=0.3}]'])
    (defense,) = cfg.build_defenses()
    assert type(defense).__module__ == "fedsim_outside" and defense.tag() == "update_dropout(p=0.3)"
    out = defense.apply({"w": torch.ones(100_000)}, DefenseContext(generator=torch.Generator().manual_seed(0)))
    assert (out["w"] == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    with pytest.raises(Exception, match="p"):
        load_config(None, ['defenses=[{name="update_dropout", p=1.5}]'])
