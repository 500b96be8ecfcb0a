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
