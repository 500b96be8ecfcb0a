"""A run killed with SIGKILL at several points and resumed equals an uninterrupted run (real Flower + Ray, real
processes): the same model checksum per round, each (round, client, attack) row exactly once, the same PSNR."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from reference_run import ATTACKED, ROOT, ROUNDS, assert_same_results, command, table

pytestmark = pytest.mark.ray


def run_and_kill(cmd: list[str], run: Path, when, what: str) -> None:
    """Start the run and SIGKILL its whole process group (driver, Ray, actors) as soon as ``when`` holds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not when(table(run / "rounds.parquet"), table(run / "leakage.parquet")):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the kill point ({what}): {proc.stderr.read().decode()[-1500:]}")
            if time.time() > deadline:
                pytest.fail(f"kill point never reached: {what}")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resume(cmd: list[str]) -> None:
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def check_equal(run: Path, reference: Path) -> None:
    assert_same_results(run, reference)
    assert not any((run / "queue").iterdir()), "the backlog was not emptied"
    final = torch.load(run / "checkpoints" / f"round_{ROUNDS:03d}.pt", weights_only=True)
    assert final and all(isinstance(v, torch.Tensor) for v in final.values())


def test_reference_run_is_complete(reference):
    rounds, rows = table(reference / "rounds.parquet"), table(reference / "leakage.parquet")
    assert list(rounds["round"]) == list(range(ROUNDS + 1)) and rounds["model_checksum"].nunique() == ROUNDS + 1
    assert len(rows) == ROUNDS * ATTACKED and (rows.status == "ok").all()


def test_killed_mid_federation_then_after_the_last_round_resumes_without_losing_a_row(reference):
    """Kill 1: after round 2 (the federation resumes from its checkpoint). Kill 2, of the resumed run: after the
    last round but before the last attack (only the backlog on disk is left to attack). Then resume once more."""
    tmp = reference.parent
    run, cmd = tmp / "killed", command(tmp, "killed")
    run_and_kill(cmd, run, lambda r, l: len(r) >= 3, "round 2 finished")
    assert len(table(run / "rounds.parquet")) < ROUNDS + 1
    run_and_kill(cmd + ["--resume"], run, lambda r, l: len(r) == ROUNDS + 1, "every round finished")
    before = table(run / "leakage.parquet")
    assert len(before) < ROUNDS * ATTACKED, "every attack had already finished: the kill point was missed"
    assert any((run / "queue").iterdir()), "the backlog was not on disk"
    checksums = list(table(run / "rounds.parquet")["model_checksum"])
    resume(cmd)
    assert list(table(run / "rounds.parquet")["model_checksum"]) == checksums  # the federation did not rerun
    check_equal(run, reference)


def test_resume_refuses_a_config_that_would_change_the_results(reference, monkeypatch):
    from typer.testing import CliRunner

    from fedsim.cli import app

    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, command(reference.parent, "reference")[3:] + ["--set", "client.lr=0.5", "--resume"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "client.lr" in lines[0], result.stderr


def processes_under(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path`` (the run's private temp dir: its Ray processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_ctrl_c_stops_within_seconds_with_one_line_and_the_printed_command_resumes(reference):
    """Ctrl-C (SIGINT to the foreground process group, as a terminal sends it) while attacks run: exit 130 with one
    line naming the run directory and the command that continues it, no traceback, no Ray started after the
    interrupt and none left running; that command then finishes the run with the uninterrupted run's results."""
    tmp = reference.parent
    run, cmd = tmp / "interrupted", command(tmp, "interrupted")
    private = Path(tempfile.mkdtemp(prefix="fs-int-"))  # short: Ray's socket paths below it must fit 107 bytes
    env = {**os.environ, "TMPDIR": str(private)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    deadline = time.time() + 300
    while len(table(run / "rounds.parquet")) < 2:  # round 1 finished: its attacks are running
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert proc.returncode == 130, err[-2000:]
    assert seconds < 30, f"took {seconds:.0f} s to stop"  # it took 66 s when the collector restarted Ray
    assert "Traceback" not in err and err.count("Started a local Ray instance") <= 1, err[-2000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and str(run) in stopped[0], err[-2000:]
    deadline = time.time() + 20
    while processes_under(private) and time.time() < deadline:
        time.sleep(0.5)
    assert not processes_under(private), "Ray processes outlived the interrupted run"
    assert len(table(run / "rounds.parquet")) < ROUNDS + 1  # it really stopped early
    command_line = stopped[0].split("continue it with: ", 1)[1]
    resumed = subprocess.run(command_line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600,
                             executable="/bin/bash", env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                                                  f"{os.environ['PATH']}"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    check_equal(run, reference)
