"""fedsim as a Flower app: ``flwr run .`` under Flower's own runtime (a local SuperLink in simulation mode, the
ServerApp in its own process) gives the same run directory as ``fedsim run`` for the same experiment."""

import subprocess

import pytest
from reference_run import OVERRIDES, ROOT, assert_same_results, table

from fedsim.flwr_local import flwr_env, stop_processes_mentioning

pytestmark = pytest.mark.ray


@pytest.fixture
def flower_env(tmp_path):
    """A private FLWR_HOME and ports; the local SuperLink ``flwr run`` starts there (detached, outliving the
    command) and its children are stopped by their own PIDs afterwards."""
    home = tmp_path / "flwr-home"
    yield flwr_env(home)
    stop_processes_mentioning(str(home))


def flwr_run(env: dict, overrides: list[str], supernodes: int) -> str:
    """``flwr run . --stream``; its exit code is 0 whether or not the app failed (Flower's behaviour): the run's
    status is read with :func:`run_status`."""
    run_config = "set='" + " ".join(overrides) + "'"
    done = subprocess.run(["flwr", "run", ".", "--run-config", run_config, "--federation-config",
                           f"num-supernodes={supernodes} client-resources-num-cpus=1", "--stream"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def run_status(env: dict) -> tuple[str, str]:
    """(status, sub-status) of the newest run on the local SuperLink, from ``flwr list`` as the README says."""
    import json

    listed = subprocess.run(["flwr", "list", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    newest = max(runs, key=lambda r: r["run-id"] if isinstance(r["run-id"], int) else int(r["run-id"]))
    status = newest["status"]
    return tuple(status.split(":", 1)) if ":" in status else (status, "")


def test_flwr_run_equals_fedsim_run(reference, flower_env, tmp_path):
    out = tmp_path / "runs"
    flwr_run(flower_env, [f"output_dir={out}", "name=flower", *OVERRIDES], supernodes=4)
    assert run_status(flower_env) == ("finished", "completed")
    assert_same_results(out / "flower", reference)
    assert (out / "flower" / "attacker_workers.json").is_file()


def test_flwr_run_with_the_wrong_federation_size_fails_with_one_line(data_dir, flower_env, tmp_path):
    out = tmp_path / "runs"
    log = flwr_run(flower_env, [f"output_dir={out}", "name=small", "federation.num_clients=4",
                                "federation.rounds=1", "attack.clients_per_round=0"], supernodes=2)
    reason = "federation.num_clients=4 but the Flower federation has 2 nodes"
    assert reason in log, log[-2000:]
    assert "--federation-config num-supernodes=4" in log
    assert run_status(flower_env) == ("finished", "failed")
    fedsim_lines = [line for line in log.splitlines() if "fedsim: " in line]
    assert len(fedsim_lines) == 1 and reason in fedsim_lines[0], log[-3000:]
    assert "fedsim/serverapp.py" not in log and "fedsim/federation.py" not in log, \
        "fedsim's own stack was printed"  # Flower's frames remain
    assert len(table(out / "small" / "rounds.parquet")) == 0
