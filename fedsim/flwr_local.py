"""Run a Flower app under ``flwr run`` on this machine, with its own local SuperLink, and stop what it started.

``flwr run`` starts a detached local SuperLink in ``FLWR_HOME``; each caller here gets a private home and private
ports (several runs, tests or studies side by side never share one), and :func:`stop_processes_mentioning` stops
that SuperLink and its children by their own PIDs, found by the unique home path in their command lines (never by
process name). ``flwr run`` exits 0 whether or not the app failed: :func:`flwr_run` returns Flower's status of the
run (``flwr list``) with its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``flwr run`` with its own local SuperLink in ``home``."""
    return dict(os.environ, FLWR_HOME=str(home), RAY_TMPDIR=tempfile.mkdtemp(prefix="fsflwr-"),
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
                FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
                **extra)


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (a unique temp path), this process excluded."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def stop_processes_mentioning(text: str, sig: int = signal.SIGKILL) -> None:
    for pid in processes_mentioning(text):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_for_port(port: int, timeout: float = 120.0, host: str = "127.0.0.1") -> None:
    """Until something listens on ``port`` (a SuperLink just started), else TimeoutError."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.2)


@dataclass
class FlowerRun:
    run_id: str
    status: str  # Flower's, e.g. "finished:completed" or "finished:failed"
    log: str


def flwr_run(app: Path, run_config: str, *, env: dict[str, str], cwd: Path, supernodes: int | None = None,
             federation: str | None = None, timeout: float = 3600) -> FlowerRun:
    """``flwr run APP [FEDERATION] --run-config ... --stream`` (the simulation runtime with ``supernodes`` nodes,
    or the SuperLink connection ``federation`` names in ``FLWR_HOME/config.toml``)."""
    command = ["flwr", "run", str(app), *([federation] if federation else []), "--run-config", run_config]
    if supernodes is not None:
        command += ["--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus=1"]
    done = subprocess.run([*command, "--stream"], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = done.stdout + done.stderr
    if done.returncode != 0 or "Successfully started run " not in log:
        raise RuntimeError(f"flwr run did not start the run:\n{log[-3000:]}")
    run_id = log.split("Successfully started run ", 1)[1].split()[0]
    listed = subprocess.run(["flwr", "list", *([federation] if federation else []), "--format", "json"], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=300)
    runs = {str(r["run-id"]): r["status"] for r in json.loads(listed.stdout)["runs"]}
    return FlowerRun(run_id, runs.get(run_id, "unknown"), log)
