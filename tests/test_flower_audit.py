"""Auditing a user's own Flower app (examples/flower-app: its own CNN, data loading and FedAvg subclass, Flower's
DP wrapper) with fedsim.audit: the same federation with and without the audit, the audit's rows and ground truth,
and its bad inputs."""

import json
from concurrent.futures import ThreadPoolExecutor
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from test_federation import assert_no_ground_truth

from fedsim.audit import AuditError, AuditFile, audited
from fedsim.audit.app import DeclaredRecipe, _Recorder
from fedsim.audit.auditor import AuditPlan, Auditor, PoolSettings
from fedsim.contract import ModelSpec, ServerView, ThreatModel
from fedsim.flwr_local import flwr_env, flwr_run, processes_mentioning, stop_processes_mentioning
from fedsim.protocol import SIDE, Exchange, arrays_to_numpy, read_side
from fedsim.results import RunDirectory, batch_file_name, model_checksum

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
OUTSIDE_PLUGIN = Path(__file__).parent / "outside_plugin"


@pytest.fixture(scope="module")
def example():
    """The example app's own modules, as its ClientApp imports them (for the clients' true training images)."""
    sys.path.insert(0, str(EXAMPLE))
    import flowerapp.task

    yield flowerapp.task
    sys.path.remove(str(EXAMPLE))


def context(run_config: dict) -> Context:
    return Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


# ------------------------------------------------------------------------------------------------------------
# One federation, run twice under `flwr run`: audited and not


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory, data_dir):
    """The example app for 2 rounds on 2 nodes, one training image each (batch 1), Flower's server-side fixed
    clipping around its FedAvg subclass: once audited (IG and the outside spy attack) and once with
    ``fedsim-audit=""``."""
    root = tmp_path_factory.mktemp("flower-audit")
    data_dir = Path(data_dir).resolve()  # Flower's processes run elsewhere
    seen = root / "seen"
    shipped = (EXAMPLE / "audit.toml").read_text()
    queue = root / "audited" / "fedsim-audits" / "audited" / "queue"
    audit = shipped.replace(
        'attacks = [{ name = "inverting_gradients", iterations = 200, restarts = 1, lr = 0.1 }]',
        'attacks = [{ name = "inverting_gradients", iterations = 200, restarts = 1, lr = 0.1 }, '
        f'{{ name = "outside_spy", record_to = "{seen}", queue = "{queue}" }}]'
    ).replace("attacked_per_round = 1\n", 'attacked_per_round = 1\nname = "audited"\n')
    assert audit.count("outside_spy") == 1 and audit.count('name = "audited"') == 1
    audit_file = root / "audit.toml"
    audit_file.write_text(audit)
    common = (f"num-server-rounds=2 max-train-examples=1 batch-size=1 data-dir='{data_dir}' "
              "privacy='server-fixed-clipping' noise-multiplier=0.0 clipping-norm=0.5")

    def run(name: str, audit_key: str) -> dict:  # each with its own local SuperLink: the two run side by side
        cwd = root / name
        cwd.mkdir()
        env = flwr_env(root / f"flwr-home-{name}", PYTHONPATH=str(OUTSIDE_PLUGIN))  # the spy, in every process
        try:
            done = flwr_run(EXAMPLE, f"{common} final-model='{cwd / 'final.pt'}' "
                                     f"client-report='{cwd / 'report.jsonl'}' fedsim-audit='{audit_key}'",
                            env=env, cwd=cwd, supernodes=2, timeout=600)
        finally:
            stop_processes_mentioning(str(root / f"flwr-home-{name}"))
        return {"dir": cwd, "log": done.log, "status": done.status}

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, name, key) for name, key in (("audited", str(audit_file)), ("plain", ""))}
        runs = {name: future.result() for name, future in futures.items()}
    runs["seen"] = seen
    return runs


@pytest.mark.ray
def test_an_audited_app_computes_the_same_federation_and_its_strategy_sees_the_same_replies(example_runs):
    audited_run, plain = example_runs["audited"], example_runs["plain"]
    assert audited_run["status"] == plain["status"] == "finished:completed", audited_run["log"][-3000:]
    assert not (plain["dir"] / "fedsim-audits").exists()  # unaudited: no run directory at all

    def replies(run):  # what the app's strategy aggregated, per round: records and a digest of their values
        lines = [json.loads(line) for line in (run["dir"] / "report.jsonl").read_text().splitlines()]
        return {r: sorted(line["sha256"] for line in lines if line["round"] == r) for r in (1, 2)}, \
            {tuple(line["records"]) for line in lines}

    (digests_a, records_a), (digests_p, records_p) = replies(audited_run), replies(plain)
    assert digests_a == digests_p and all(len(d) == 2 for d in digests_a.values())
    assert records_a == records_p == {("arrays", "metrics")}  # the side channel never reached the strategy
    final_a = torch.load(audited_run["dir"] / "final.pt", weights_only=True)
    final_p = torch.load(plain["dir"] / "final.pt", weights_only=True)
    assert final_a.keys() == final_p.keys()
    for key in final_a:  # FedAvg sums in reply order, which may differ between runs: equal to float rounding
        torch.testing.assert_close(final_a[key], final_p[key], rtol=1e-6, atol=1e-7)


@pytest.mark.ray
def test_an_audited_app_writes_leakage_rows_scored_against_the_recorded_batches(example_runs, example, data_dir):
    run_dir = example_runs["audited"]["dir"] / "fedsim-audits" / "audited"
    leakage = pd.read_parquet(run_dir / "leakage.parquet")
    ig = leakage[leakage.attack == "inverting_gradients"].sort_values("round")
    assert ig["round"].tolist() == [1, 2] and (ig.status == "ok").all(), ig[["status", "error"]]
    assert (ig.batch_size == 1).all() and (ig.label_accuracy == 1.0).all()
    # real leakage at batch 1 after 200 iterations: above what a flat image of each picture's own mean colour
    # scores (14.3 dB on CIFAR-10 images 0-999; mid-grey: 12.5 dB), with structure (SSIM)
    assert (ig.psnr_mean > 14.5).all() and (ig.ssim_mean > 0.2).all(), ig[["psnr_mean", "ssim_mean"]]
    for row in ig.itertuples():
        images, _ = example.load_data(int(row.client_id), 2, str(data_dir), 1)
        truth = np.clip(np.rint((images.numpy() * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        with np.load(run_dir / "reconstructions" / batch_file_name(row.round, row.client_id, row.attack)) as kept:
            np.testing.assert_allclose(kept["ground_truth"].astype(int), truth.astype(int), atol=1)
    rounds = pd.read_parquet(run_dir / "rounds.parquet").sort_values("round")
    assert rounds["round"].tolist() == [0, 1, 2] and rounds.test_accuracy.between(0, 1).all()
    final = torch.load(example_runs["audited"]["dir"] / "final.pt", weights_only=True)
    assert rounds.model_checksum.iloc[-1] == model_checksum({k: v.numpy() for k, v in final.items()})
    report = subprocess.run(["fedsim", "report", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and (run_dir / "report.html").is_file(), report.stderr[-1000:]


@pytest.mark.ray
def test_recorded_batches_never_reach_an_observed_update_or_the_attacker(example_runs, example, data_dir):
    calls = sorted(example_runs["seen"].iterdir())
    assert len(calls) == 2  # one call a round, in the attacker's Ray actor
    truths = [example.load_data(pid, 2, str(data_dir), 1)[0].numpy() for pid in (0, 1)]
    images = truths + [t * 0.5 + 0.5 for t in truths]  # model inputs and [0, 1] pixels
    for call in calls:
        observed = pickle.loads((call / "observed.pkl").read_bytes())
        assert len(observed) == 1 and observed[0].model.name == "flowerapp.task:Net"
        for obs in observed:
            assert_no_ground_truth(obs, [], images)
        on_disk = [torch.load(p, weights_only=True) for p in sorted((call / "queue").glob("observed_*.pt"))]
        assert len(on_disk) == 1
        for record in on_disk:
            assert_no_ground_truth(record, [], images)


# ------------------------------------------------------------------------------------------------------------
# In-process: the pieces and the bad inputs


def test_the_shipped_audit_file_is_valid_and_declares_the_apps_recipe():
    settings = AuditFile.load(EXAMPLE / "audit.toml")
    assert settings.model == "flowerapp.task:Net" and settings.recipe.lr == "config:lr"
    recipe = DeclaredRecipe(settings.recipe, {"local-epochs": 2, "batch-size": 4}, EXAMPLE / "audit.toml")
    config = recipe.train_config({"lr": 0.05, "server-round": 3}, num_examples=10)
    assert config == {"mode": "fedavg", "lr": 0.05, "epochs": 2, "batch_size": 4, "num_samples": 10,
                      "shuffle": False, "bn_mode": "train"}


def test_without_the_run_config_key_the_strategy_is_returned_unchanged():
    from flwr.serverapp.strategy import FedAvg

    strategy = FedAvg()
    assert audited(strategy, context({})) is strategy
    assert audited(strategy, context({"fedsim-audit": ""})) is strategy


BASE_AUDIT = {"model": 'model = "flowerapp.task:Net"', "recipe": '[recipe]\nlr = "config:lr"'}
BAD_AUDIT_FILES = [  # (case, part of the file replaced or added, its text, what the one line says)
    ("missing", None, None, "no audit file at"),
    ("unknown key", "extra", 'colour = "red"', "colour: unknown key"),
    ("model not importable", "model", 'model = "no_such_package.task:Net"', "cannot import no_such_package"),
    ("model attribute missing", "model", 'model = "torch.nn:NoSuchNet"', "has no attribute 'NoSuchNet'"),
    ("model not a path", "model", 'model = "Net"', "expected the import path of the app's model"),
    ("recipe reference", "recipe", '[recipe]\nlr = "lr"', "recipe.lr: 'lr' is neither a number nor"),
    ("run key missing", "recipe", '[recipe]\nlr = 0.1\nbatch_size = "run:batch"', "the run config has no 'batch'"),
    ("shape does not fit", "data", '[data]\nshape = [1, 8, 8]\nmean = [0.5]\nstd = [0.5]',
     "data.shape=[1, 8, 8] does not fit"),
    ("attack unknown", "attacks", 'attacks = [{ name = "no_such_attack" }]', "unknown attack 'no_such_attack'"),
]


@pytest.mark.parametrize("case,part,text,expected", BAD_AUDIT_FILES, ids=[c[0] for c in BAD_AUDIT_FILES])
def test_a_bad_audit_file_is_one_line_before_round_one(tmp_path, monkeypatch, case, part, text, expected):
    from flwr.serverapp.strategy import FedAvg

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    if part is not None:
        parts = {**BASE_AUDIT, part: text}
        top = [v for v in parts.values() if not v.startswith("[")]
        tables = [v for v in parts.values() if v.startswith("[")]
        (tmp_path / "audit.toml").write_text("\n".join(top + tables) + "\n")
    with pytest.raises(AuditError) as err:
        audited(FedAvg(), context({"fedsim-audit": "audit.toml"}), app_dir=tmp_path)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert not (tmp_path / "fedsim-audits").exists()  # nothing written


def test_round_one_checks_the_model_and_the_recipe_against_what_the_strategy_sends(tmp_path, monkeypatch):
    from flwr.app import Message
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from flowerapp.task import Net

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # a real Message outside a Flower run
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    (tmp_path / "audit.toml").write_text('model = "flowerapp.task:Net"\n[recipe]\nlr = "config:lr"\n')
    strategy = audited(FedAvg(), context({"fedsim-audit": "audit.toml"}), app_dir=tmp_path)
    try:
        good = ArrayRecord(Net().state_dict())
        ok = Message(RecordDict({"arrays": good, "config": ConfigRecord({"lr": 0.1})}), dst_node_id=1,
                     message_type="train")
        strategy.check_round_one(ok)
        wrong_model = ArrayRecord(torch.nn.Linear(4, 2).state_dict())
        with pytest.raises(AuditError, match="model = 'flowerapp.task:Net': the public model does not fit Net"):
            strategy.check_round_one(Message(RecordDict({"arrays": wrong_model, "config": ConfigRecord({"lr": 0.1})}),
                                             dst_node_id=1, message_type="train"))
        with pytest.raises(AuditError, match=r"recipe.lr = 'config:lr' but the strategy's train ConfigRecord has no "
                                             r"such key \(it has \['learning-rate'\]\)"):
            strategy.check_round_one(Message(RecordDict({"arrays": good,
                                                         "config": ConfigRecord({"learning-rate": 0.1})}),
                                             dst_node_id=1, message_type="train"))
        with pytest.raises(AuditError, match="keys.arrays = 'arrays' but the strategy sends the model under"):
            strategy.check_round_one(Message(RecordDict({"weights": good, "config": ConfigRecord({"lr": 0.1})}),
                                             dst_node_id=1, message_type="train"))
    finally:
        strategy.close()


def test_a_reply_the_audit_cannot_read_is_one_warning_and_the_others_are_still_audited(tmp_path, caplog, outside):
    """No side channel (audit_mod missing on that client), another arrays key: one warning per kind, across
    rounds, no exception; the readable reply still gets its row."""
    spec = ModelSpec("lenet_zhu", 10, (3, 8, 8))
    from fedsim.models import build_from_spec
    from fedsim.training import float_state

    state = {k: v.numpy() for k, v in float_state(build_from_spec(spec)).items()}
    view = ServerView(spec, ((0.5,) * 3, (0.5,) * 3), ThreatModel())
    plan = AuditPlan(view, ({"name": "outside_mean"},), 0, pool=PoolSettings(executor="inline", workers=1),
                     learn=False, backlog=False)
    store = RunDirectory(tmp_path / "run")
    auditor = Auditor(plan, store, lambda ids: (_ for _ in ()).throw(AssertionError("no dataset")))
    sent = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in state.items()}),
                       "config": ConfigRecord({"mode": "fedsgd", "lr": 0.1, "epochs": 1, "batch_size": 1,
                                               "num_samples": 1, "shuffle": False, "bn_mode": "train"})})
    recorder = _Recorder()
    recorder.add(torch.zeros(1, 3, 8, 8), torch.tensor([3]))

    def reply(side: bool, arrays_key: str = "arrays") -> RecordDict:
        content = RecordDict({arrays_key: ArrayRecord({k: torch.from_numpy(v + 0.01) for k, v in state.items()}),
                              "metrics": MetricRecord({"num-examples": 1})})
        if side:
            content[SIDE] = recorder.record(4)
        return content

    caplog.set_level(logging.WARNING, logger="fedsim")
    try:
        for server_round in (1, 2):
            submitted = auditor.observe(server_round, [Exchange(sent, reply(False)), Exchange(sent, reply(True)),
                                                       Exchange(sent, reply(True, "weights"))])
            assert [o.client_id for o in submitted] == [4]
    finally:
        auditor.close()
        store.close()
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.getMessage().startswith("fedsim audit")]
    assert len(warnings) == 2, warnings  # one per kind of problem, not one per reply and round
    assert any("add fedsim.audit.audit_mod to the ClientApp's mods" in w for w in warnings)
    assert any("no ArrayRecord 'arrays'" in w and "set keys.arrays" in w for w in warnings)
    rows = pd.read_parquet(tmp_path / "run" / "leakage.parquet")
    assert rows["round"].tolist() == [1, 2] and (rows.status == "ok").all()


def test_recorded_batches_keep_each_sample_once_and_the_order_it_was_trained_in():
    rng = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 4, 4, generator=rng), torch.tensor([1, 2, 1])
    recorder = _Recorder()
    recorder.add(x[[0, 1]], y[[0, 1]])  # epoch 1
    recorder.add(x[[2]], y[[2]])
    recorder.add(x[[2, 0]], y[[2, 0]])  # epoch 2, reshuffled
    recorder.add(x[[1]], y[[1]])
    content = RecordDict({SIDE: recorder.record(5)})
    audit = read_side(content, 3, ((0.5,) * 3, (0.25,) * 3))
    assert audit.client_id == 5 and audit.round == 3
    assert audit.sample_ids == (0, 1, 2) and audit.step_ids == (0, 1, 2, 2, 0, 1)
    np.testing.assert_allclose(audit.images, np.clip(x.numpy() * 0.25 + 0.5, 0, 1), atol=1e-6)
    assert audit.labels.tolist() == [1, 2, 1]
    # a client that records nothing: its partition id, no ground truth
    empty = read_side(RecordDict({SIDE: _Recorder().record(2)}), 1)
    assert empty.client_id == 2 and not empty.recorded and empty.images is None


# ------------------------------------------------------------------------------------------------------------
# The deployment runtime: a SuperLink and two SuperNodes on this machine


@pytest.mark.ray
def test_the_example_app_is_audited_under_the_deployment_runtime(tmp_path, data_dir):
    """``flower-superlink`` and two ``flower-supernode`` processes (insecure, local): the ServerApp runs in its own
    process without Ray, so the audit starts a private Ray there for the attacker; rows are written and every
    process started here is stopped by its own PID."""
    from fedsim.flwr_local import free_port, wait_for_port

    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()  # Flower 1.42's SuperLink serves its Control, Fleet and Runtime APIs on one HTTP port
    (home / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = flwr_env(home)
    logs = tmp_path / "logs"
    logs.mkdir()
    started = [subprocess.Popen(["flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
                                 "--port", str(port), "--database", str(tmp_path / "superlink.db")],
                                env=env, cwd=tmp_path, stdout=open(logs / "superlink.log", "w"),
                                stderr=subprocess.STDOUT)]
    for partition in (0, 1):
        started.append(subprocess.Popen(
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
             "--node-config", f"partition-id={partition} num-partitions=2"],
            env=env, cwd=tmp_path, stdout=open(logs / f"supernode{partition}.log", "w"), stderr=subprocess.STDOUT))
    try:
        wait_for_port(port)
        run = flwr_run(EXAMPLE, f"num-server-rounds=2 max-train-examples=1 batch-size=1 "
                                f"data-dir='{Path(data_dir).resolve()}' fedsim-audit='audit.toml'",
                       env=env, cwd=tmp_path, federation="deploy", timeout=900)
        assert run.status == "finished:completed", run.log[-3000:]
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        children = processes_mentioning(str(home)) + processes_mentioning(str(tmp_path / "superlink.db"))
        for pid in children:  # what they spawned (the ServerApp and ClientApp processes), by their own PIDs
            os.kill(pid, 9)
    assert not processes_mentioning(str(home))
    runs = list((tmp_path / "fedsim-audits").glob("run-*"))
    assert len(runs) == 1, (logs / "superlink.log").read_text()[-3000:]
    leakage = pd.read_parquet(runs[0] / "leakage.parquet")
    assert sorted(leakage["round"]) == [1, 2] and (leakage.status == "ok").all(), leakage[["status", "error"]]
    assert (leakage.psnr_mean > 14.5).all() and (leakage.ssim_mean > 0.2).all(), leakage[["psnr_mean", "ssim_mean"]]


def test_audit_mod_records_the_batches_only_when_the_audit_attacks_something(tmp_path, monkeypatch):
    """The side channel always names the client; the batches go with it only if the audit file attacks anything
    (with attacks off, recording would be the audit's whole cost on the clients)."""
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.audit import audit_mod, record_batch
    from fedsim.audit.app import _records_anything

    for key, value in (("_run_id", 1), ("_node_id", 2), ("_task_id", 3)):
        monkeypatch.setattr(TaskIdentity, key, value)
    base = 'model = "flowerapp.task:Net"\n'
    (tmp_path / "on.toml").write_text(base + 'attacks = [{ name = "inverting_gradients" }]\n[recipe]\nlr = 0.1\n')
    (tmp_path / "off.toml").write_text(base + "attacks = []\n[recipe]\nlr = 0.1\n")
    (tmp_path / "none.toml").write_text(base + 'attacks = [{ name = "dlg" }]\nattacked_per_round = 0\n'
                                               "[recipe]\nlr = 0.1\n")
    _records_anything.cache_clear()

    def train(message, context):  # a user's train function: records its one batch
        record_batch(torch.ones(2, 3, 4, 4), torch.tensor([1, 2]))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 2})}), reply_to=message)

    sides = {}
    for name in ("on", "off", "none"):
        context = Context(run_id=1, node_id=2, node_config={"partition-id": 3}, state=RecordDict(),
                          run_config={"fedsim-audit": str(tmp_path / f"{name}.toml")})
        msg = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=2, message_type="train")
        sides[name] = audit_mod(msg, context, train).content[SIDE]
    assert all(side["partition-id"] == 3 for side in sides.values())
    assert "batches" in sides["on"] and "batches" not in sides["off"] and "batches" not in sides["none"]
    unaudited = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={"fedsim-audit": ""})
    msg = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=2, message_type="train")
    assert SIDE not in audit_mod(msg, unaudited, train).content  # not audited: the reply as the app made it


# ------------------------------------------------------------------------------------------------------------
# Flower's own strategies inside `audited`, driven round by round in this process with real Messages


class _Nodes:
    """The two nodes a Grid reports (all the strategies' sampling asks of it here)."""

    def get_node_ids(self):
        return [1, 2]


def _strategies():
    from flwr.serverapp import strategy as fl

    def dp(wrapper, **kwargs):
        return lambda: wrapper(fl.FedAvg(), noise_multiplier=0.5, num_sampled_clients=2, **kwargs)

    return {
        "FedAvg": fl.FedAvg,
        "FedProx": lambda: fl.FedProx(proximal_mu=0.1),
        "FedAdam": lambda: fl.FedAdam(eta=0.05),
        "FedYogi": fl.FedYogi,
        "ServerSideFixedClipping": dp(fl.DifferentialPrivacyServerSideFixedClipping, clipping_norm=1.0),
        "ClientSideFixedClipping": dp(fl.DifferentialPrivacyClientSideFixedClipping, clipping_norm=1.0),
        "ServerSideAdaptiveClipping": dp(fl.DifferentialPrivacyServerSideAdaptiveClipping, clipped_count_stddev=1.0),
        "ClientSideAdaptiveClipping": dp(fl.DifferentialPrivacyClientSideAdaptiveClipping, clipped_count_stddev=1.0),
    }


def _federate(strategy, rounds: int, images: torch.Tensor | None) -> list[dict[str, np.ndarray]]:
    """``rounds`` rounds of the two nodes of :class:`_Nodes` through ``strategy`` with real Messages (each client's
    local model: what it was sent plus a fixed step); ``images``: the batch each client records (audit_mod's side
    channel), None for an app without the audit. The global model after each round."""
    import random

    from flwr.app import Message
    from flowerapp.task import Net

    random.seed(0), np.random.seed(0)
    torch.manual_seed(0)
    arrays, models = ArrayRecord(Net().state_dict()), []
    for server_round in range(1, rounds + 1):
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.05}), _Nodes()))
        replies = []
        for msg in sent:
            node = msg.metadata.dst_node_id
            step = torch.Generator().manual_seed(100 * server_round + node)
            local = {k: v + 0.01 * torch.randn(v.shape, generator=step, dtype=v.dtype)
                     for k, v in msg.content["arrays"].to_torch_state_dict().items()}
            content = RecordDict({"arrays": ArrayRecord(local),
                                  "metrics": MetricRecord({"num-examples": 1, "norm_bit": node % 2})})
            if images is not None:
                recorder = _Recorder()
                recorder.add(images[node - 1], torch.tensor([node]))
                content[SIDE] = recorder.record(node - 1)
            replies.append(Message(content, reply_to=msg))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        models.append({k: v.copy() for k, v in arrays_to_numpy(arrays).items()})
    return models


@pytest.fixture
def in_process(tmp_path, monkeypatch, outside):
    """Real Messages outside a Flower run, the example app importable, the audit file written by the test."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

    def write(attacks: str, attacker: str) -> None:
        (tmp_path / "audit.toml").write_text(f'model = "flowerapp.task:Net"\nattacks = {attacks}\n'
                                             'attacked_per_round = 2\nname = "audit"\n'
                                             '[recipe]\nlr = "config:lr"\nlocal_epochs = 1\nbatch_size = 1\n'
                                             f'[attacker]\n{attacker}\n')
    return write


@pytest.mark.parametrize("name", list(_strategies()))
def test_flowers_strategies_compute_the_same_models_audited_and_every_reply_is_audited(name, tmp_path, in_process):
    """Three rounds of two clients through the strategy alone and through ``audited(strategy)``: the global models
    are bit-identical (server optimiser state and DP noise included, under the same seed: the audit draws nothing
    from the global generators), and the audit writes a row per reply and round."""
    in_process('[{ name = "outside_mean" }]', 'executor = "inline"')
    plain = _federate(_strategies()[name](), 3, None)
    wrapped = audited(_strategies()[name](), context({"fedsim-audit": "audit.toml"}), app_dir=tmp_path)
    try:
        seen = _federate(wrapped, 3, torch.rand(2, 1, 3, 32, 32))
    finally:
        wrapped.close()
    for a, b in zip(plain, seen):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(plain[0][k], plain[2][k]) for k in plain[0])  # the model moved
    rows = pd.read_parquet(tmp_path / "fedsim-audits" / "audit" / "leakage.parquet")
    assert sorted(zip(rows["round"], rows.client_id)) == [(r, c) for r in (1, 2, 3) for c in (0, 1)]
    assert (rows.status == "ok").all()


@pytest.mark.ray
def test_a_hung_attack_neither_slows_the_users_rounds_nor_loses_the_others_rows(tmp_path, in_process, ray_local):
    """An attack that never returns, on the attacker's Ray: the strategy's rounds go on at the tee's pace, the
    attack becomes an error row at ``[attacker] timeout`` and the attack queued behind it still gets its rows."""
    import time

    from flwr.serverapp.strategy import FedAvg

    in_process('[{ name = "outside_sleep", seconds = 3600 }, { name = "outside_mean" }]',
               'executor = "ray"\nworkers = 1\ntimeout = 4')
    wrapped = audited(FedAvg(), context({"fedsim-audit": str(tmp_path / "audit.toml")}), app_dir=EXAMPLE)
    try:
        t0 = time.monotonic()
        _federate(wrapped, 2, torch.rand(2, 1, 3, 32, 32))
        rounds_took = time.monotonic() - t0
    finally:
        wrapped.close()  # waits for every attack: the hung one ends at its timeout
    assert rounds_took < 4, rounds_took  # both rounds done before the first timeout fired
    rows = pd.read_parquet(tmp_path / "fedsim-audits" / "audit" / "leakage.parquet")
    assert len(rows) == 2 * 2 * 2  # rounds x clients x attacks
    hung, other = rows[rows.attack == "outside_sleep"], rows[rows.attack == "outside_mean"]
    assert (hung.status == "error").all() and hung.error.str.contains("attack.timeout=4").all()
    assert (other.status == "ok").all()
    assert ray_local.is_initialized()  # the audit used the Ray it found and left it up
