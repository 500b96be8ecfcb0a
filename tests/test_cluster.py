"""A real multi-node Ray cluster on this machine: a head and a worker node that carries a custom resource; a
`fedsim run --ray-address` places its attacker actors on that node through `attack.resources`."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="fscl-")
    monkeypatch.setenv("RAY_TMPDIR", tmp)  # a private temp dir: no stale cluster file can capture this one
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 * 1024 * 1024})
    worker = cluster.add_node(num_cpus=0, resources={"attacker_node": 2}, object_store_memory=100 * 1024 * 1024)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_attacker_actors_run_on_the_node_with_the_attacker_resource(cluster, tmp_path, data_dir):
    cl, worker = cluster
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.toml", "--quiet",
           "--ray-address", cl.address]
    for o in [f'output_dir="{tmp_path}"', 'name="cluster"', "federation.num_clients=2", "federation.clients_per_round=2",
              "federation.rounds=2", "data.test_samples=50", "attacks.0.iterations=20", "attacks.0.restarts=1",
              "attack.resources={attacker_node=1}", "attack.workers=2"]:
        cmd += ["--set", o]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": cl.address})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = pd.read_parquet(tmp_path / "cluster" / "leakage.parquet")
    assert len(rows) == 4 and (rows.status == "ok").all()
    workers = json.loads((tmp_path / "cluster" / "attacker_workers.json").read_text())
    assert len(workers) == 2
    assert {w["node_id"] for w in workers} == {worker.node_id}  # both on the worker node, none on the head
    assert worker.node_id != cl.head_node.node_id


def test_a_resource_the_cluster_lacks_is_one_line_after_connecting(cluster, tmp_path, data_dir):
    cl, _ = cluster
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "experiments/quickstart.toml", "--quiet",
           "--ray-address", cl.address, "--set", f'output_dir="{tmp_path}"', "--set", "attack.resources={gpu_node=1}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "attack.resources.gpu_node" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_audited_flower_app_attacks_on_the_cluster_its_audit_file_names(cluster, tmp_path, monkeypatch):
    """``[attacker] ray_address``: the ServerApp of a user's app (no Ray of its own, as in Flower's deployment
    runtime) joins an existing cluster and its attacker workers go to the node with the resource the file names;
    an attack whose plugin that cluster's nodes lack is an error row naming it, at once (no waiting on restarts);
    closing the audit only disconnects: the cluster stays up."""
    import time

    import ray
    import torch
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower_audit import EXAMPLE, _federate, context

    from fedsim.audit import audited

    cl, worker = cluster
    ray.shutdown()  # this process starts outside the cluster, like a deployment-runtime ServerApp
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for key, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)

    def audit(name: str, attack: str) -> pd.DataFrame:
        (tmp_path / "audit.toml").write_text(
            f'model = "flowerapp.task:Net"\nattacks = [{attack}]\nattacked_per_round = 2\nname = "{name}"\n'
            '[recipe]\nlr = "config:lr"\nlocal_epochs = 1\nbatch_size = 1\n'
            f'[attacker]\nray_address = "{cl.address}"\nworkers = 2\nresources = {{ attacker_node = 1 }}\n')
        wrapped = audited(FedAvg(), context({"fedsim-audit": str(tmp_path / "audit.toml")}), app_dir=EXAMPLE)
        try:
            _federate(wrapped, 2, torch.rand(2, 1, 3, 32, 32))
        finally:
            wrapped.close()
        assert not ray.is_initialized()  # closing disconnected this process
        return pd.read_parquet(tmp_path / "fedsim-audits" / name / "leakage.parquet")

    rows = audit("ig", '{ name = "inverting_gradients", iterations = 5, restarts = 1 }')
    assert len(rows) == 4 and (rows.status == "ok").all()
    placed = json.loads((tmp_path / "fedsim-audits" / "ig" / "attacker_workers.json").read_text())
    assert len(placed) == 2 and {w["node_id"] for w in placed} == {worker.node_id}

    # the outside test plugin is importable here (sys.path) but not on the cluster's nodes
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "outside_plugin"))
    t0 = time.monotonic()
    rows = audit("missing", '{ name = "outside_mean" }')
    assert time.monotonic() - t0 < 60
    assert len(rows) == 4 and (rows.status == "error").all()
    assert rows.error.str.contains("could not start: ValueError: unknown attack 'outside_mean'").all(), rows.error[0]

    ray.init(address=cl.address, logging_level="ERROR", log_to_driver=False)  # the cluster is still there
    assert any(n["NodeID"] == worker.node_id and n["Alive"] for n in ray.nodes())
