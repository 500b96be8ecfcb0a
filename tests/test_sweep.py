"""``fedsim sweep``: a 4-point grid of real federations, killed part-way and continued."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from environment import env_path

from fedsim.sweep import load_sweep, process_alive, toml_value

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
base = "{base}"
name = "grid"
output_dir = "{out}"
[set]
"federation.num_clients" = 2
"federation.clients_per_round" = 2
"federation.rounds" = 2
"data.test_samples" = 20
"attack.clients_per_round" = 1
"attack.executor" = "inline"
"attack.rounds" = [2]
"attacks.0.iterations" = 30
"attacks.0.restarts" = 1
[[axes]]
key = "client.batch_size"
values = [1, 2]
[[axes]]
name = "defense"
points = [{{label = "DP", set = {{defenses = [{{name = "client_dp", clip = 1.0, noise_multiplier = 0.5}}]}}}},
          {{label = "top-k 10%", set = {{defenses = [{{name = "topk", fraction = 0.1}}]}}}}]
"""


def states(root: Path) -> dict[str, dict]:
    out = {}
    for f in sorted((root / "points").glob("*/point.json")):
        try:
            out[f.parent.name] = json.loads(f.read_text())
        except json.JSONDecodeError:  # being replaced right now
            pass
    return out


def test_toml_values_read_back_as_written():
    import tomllib

    value = {"defenses": [{"name": "gaussian_noise", "std": 1e-4, "clip": 2.5}], "flag": True,
             "label": 'a "quoted" name', "rounds": [1, 2]}
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value


@pytest.mark.ray
def test_a_killed_sweep_continues_without_rerunning_finished_points(tmp_path, data_dir):
    spec = tmp_path / "grid.toml"
    spec.write_text(SWEEP.format(base=ROOT / "experiments" / "quickstart.toml", out=tmp_path / "sweeps"))
    grid = load_sweep(spec)
    assert len(grid.points) == 4
    root = grid.root
    cmd = [sys.executable, "-m", "fedsim.cli", "sweep", str(spec)]
    env = {**os.environ, "FEDSIM_DATA_DIR": str(data_dir)}

    def cut_point() -> str | None:
        """A running point that has finished a round of its own (its rounds.parquet holds rounds 0 and 1)."""
        for name, state in states(root).items():
            rounds = root / "points" / name / "rounds.parquet"
            if state.get("status") == "running" and rounds.is_file():
                try:
                    if len(pd.read_parquet(rounds)) >= 2:
                        return name
                except (OSError, ValueError):  # being replaced right now
                    pass
        return None

    # Kill the whole sweep (driver, its Ray and the running point) once a point is done and the next is running
    # with a finished round: that one is cut off part-way.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (sum(s.get("status") == "done" for s in states(root).values()) >= 1 and cut_point()):
        assert proc.poll() is None, "the sweep ended before it was killed"
        assert time.time() < deadline, "no point was cut off part-way within 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = states(root)
    finished = {name for name, s in before.items() if s["status"] == "done"}
    cut = [name for name, s in before.items() if s["status"] == "running"]
    assert 1 <= len(finished) <= 2 and len(cut) == 1
    kept_rounds = pd.read_parquet(root / "points" / cut[0] / "rounds.parquet")
    assert len(kept_rounds) >= 2  # it was cut after a finished round
    stamps = {name: (root / "points" / name / "leakage.parquet").stat().st_mtime_ns for name in finished}
    partial = pd.read_parquet(root / "leakage.parquet")
    assert set(partial.point) == finished  # the table already holds every finished point's rows
    for name in cut:  # the point's own process died with the sweep (it would write beside the continued sweep)
        pid = before[name]["attempts"][-1]["pid"]
        deadline = time.time() + 30
        while process_alive(pid):
            assert time.time() < deadline, f"point process {pid} outlived the killed sweep"
            time.sleep(0.2)
    shown = subprocess.run([*cmd, "--status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(" done ") == len(finished) and shown.stdout.count(" cut off ") == len(cut)

    # Continue two points at a time: each on its own local Ray with half the cores.
    done = subprocess.run([*cmd, "--parallel", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(finished)} of 4 points already finished" in done.stdout
    after = states(root)
    assert len(after) == 4 and all(s["status"] == "done" for s in after.values())
    continued = sorted((s["attempts"][-1]["started"], s["attempts"][-1]["finished"])
                       for name, s in after.items() if name not in finished)
    assert any(b[0] < a[1] for a, b in zip(continued, continued[1:]))  # two points ran at the same time
    assert all("ray.num_cpus=1" in after[name]["command"] for name in after if name not in finished)
    for name in finished:  # not rerun: one attempt, rows untouched
        assert len(after[name]["attempts"]) == 1
        assert (root / "points" / name / "leakage.parquet").stat().st_mtime_ns == stamps[name]
    for name in cut:  # the point the kill cut off ran again, from where it stopped: its finished rounds kept
        assert len(after[name]["attempts"]) == 2 and after[name]["attempts"][-1]["resumed"]
        resumed_rounds = pd.read_parquet(root / "points" / name / "rounds.parquet")
        pd.testing.assert_frame_equal(resumed_rounds.iloc[:len(kept_rounds)].reset_index(drop=True), kept_rounds)
        assert len(resumed_rounds) == 3

    leakage, rounds = pd.read_parquet(root / "leakage.parquet"), pd.read_parquet(root / "rounds.parquet")
    summary = pd.read_parquet(root / "summary.parquet")
    assert set(leakage.point) == set(after) and len(leakage) == 4  # round 2 only, one attacked client per point
    assert (leakage["round"] == 2).all() and (leakage.status == "ok").all()
    assert (leakage["client.batch_size"] == leakage.batch_size).all()  # the swept value is the one that ran
    assert sorted(set(leakage.defense)) == ["DP", "top-k 10%"]
    assert leakage.groupby("point").defenses.first().str.contains("topk").sum() == 2
    assert len(rounds) == 4 * 3 and set(rounds["round"]) == {0, 1, 2}
    assert len(summary) == 4 and (summary.images == summary["client.batch_size"]).all()
    assert summary.test_accuracy.notna().all() and (summary.final_round == 2).all()
    assert (summary.utility == summary.test_accuracy).all()  # the last tenth of 2 rounds is the last round
    images = pd.read_parquet(root / "images.parquet")
    assert len(images) == summary.images.sum() and images.psnr.notna().all()
    for _, same_batch in images.groupby("client.batch_size"):  # every defense attacked the same images
        keys = same_batch.groupby("defense").apply(lambda g: sorted(zip(g.client_id, g.image)), include_groups=False)
        assert all(k == keys.iloc[0] for k in keys)
    dp = summary.defense == "DP"
    assert np.isfinite(summary.epsilon[dp]).all() and summary.epsilon[~dp].isna().all()
    assert (summary.psnr_image_std[summary.images > 1] > 0).all()  # the spread over a point's images
    # every point's own table agrees with the sweep's copy
    for name in after:
        own = pd.read_parquet(root / "points" / name / "leakage.parquet")
        assert list(own.psnr_mean) == list(leakage[leakage.point == name].psnr_mean)
    sweep_report_renders(root, summary)


def sweep_report_renders(root: Path, summary: pd.DataFrame) -> None:
    """The sweep's HTML report in headless Chromium: every plot and reconstruction loaded (FEDSIM_BROWSER)."""
    browser = env_path("FEDSIM_BROWSER", "file")
    page = root / "report.html"
    done = subprocess.run([sys.executable, "-m", "fedsim.cli", "report", str(root)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    html = page.read_text()
    assert html.count("<details>") == 4 and "leakage against test accuracy" in html
    if browser is None:
        return
    from browser import render

    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shown = render(browser, page, artifacts / "sweep_report.png")
    assert all(i["width"] > 0 for i in shown.images), [i["alt"] for i in shown.images if i["width"] == 0]
    alts = [i["alt"] for i in shown.images]
    assert alts.count("leakage against test accuracy") == 1
    assert sum(a.startswith("leakage along ") for a in alts) == 2  # one per axis
    # each point shows its attacked round: ground truth and reconstruction per image
    assert sum(a.startswith("ground truth") for a in alts) == int(summary.images.sum())
    for eps in summary.epsilon.dropna():
        assert f"{eps:.3f}" in shown.text  # the table's epsilon column


SMALL_SWEEP = """
base = "{base}"
name = "retry"
output_dir = "{out}"
[set]
"federation.num_clients" = 2
"federation.clients_per_round" = 2
"federation.rounds" = 1
"data.test_samples" = {test_samples}
"attack.clients_per_round" = 0
[[axes]]
key = "seed"
values = [1, 2]
"""


@pytest.mark.ray
def test_a_failed_point_fails_the_sweep_and_is_retried_and_a_changed_file_needs_fresh(tmp_path, data_dir):
    spec = tmp_path / "retry.toml"

    def write(test_samples: int, seeds: str = "[1, 2]") -> None:
        spec.write_text(SMALL_SWEEP.format(base=ROOT / "experiments" / "quickstart.toml", out=tmp_path / "sweeps",
                                           test_samples=test_samples).replace("[1, 2]", seeds))

    def sweep(*args):
        return subprocess.run([sys.executable, "-m", "fedsim.cli", "sweep", str(spec), *args], cwd=ROOT,
                              env={**os.environ, "FEDSIM_DATA_DIR": str(data_dir)}, capture_output=True, text=True,
                              timeout=600)

    write(20)
    grid = load_sweep(spec)
    first, second = (p.directory for p in grid.points)
    second.mkdir(parents=True)
    (second / "leakage.parquet").write_bytes(b"an earlier run's rows")  # fedsim run refuses to replace them
    failed = sweep()
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "1 points failed" in failed.stderr
    status = sweep("--status")
    assert status.stdout.count(" done ") == 1 and status.stdout.count(" failed ") == 1
    assert "already holds a run" in states(grid.root)[second.name]["error"]  # the point's one-line reason
    (second / "leakage.parquet").unlink()
    retried = sweep()
    assert retried.returncode == 0, retried.stderr[-2000:]
    after = states(grid.root)
    assert [len(s["attempts"]) for _, s in sorted(after.items())] == [1, 2]  # the finished point was not rerun
    assert all(s["status"] == "done" for s in after.values())
    write(21, seeds="[1]")  # the file now says something the finished point 0 did not run
    changed = sweep()
    assert changed.returncode == 2 and "finished with a different config (data.test_samples: 20 -> 21)" in changed.stderr
    fresh = sweep("--fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    after = states(grid.root)
    assert [len(s["attempts"]) for _, s in sorted(after.items())] == [1]  # started over: point 1 is gone too
    assert json.loads((first / "config.json").read_text())["data"]["test_samples"] == 21
