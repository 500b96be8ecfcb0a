"""The driver of ``fedsim run``: the run directory, Ray, progress, and Flower's ``run_simulation`` around the apps."""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading



from .audit import Auditor
from .checks import check_resources
from .config import ConfigError, RunConfig, resume_conflict
from .contract import LeakageRecord
from .results import RunDirectory
from .clientapp import ClientSide, make_client_app
from .federation import Federation, attacker_gpus, prepare
from .serverapp import RunInterrupted, Session, make_server_app

log = logging.getLogger("fedsim")


# ------------------------------------------------------------------------------------------------------------
# Driver


class Progress:
    """Rich progress bars for rounds and attacks (no-ops when disabled)."""

    def __init__(self, rounds: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=False)
        self.rounds = self.bar.add_task("rounds", total=rounds)
        self.attacks = self.bar.add_task("attacks", total=0)

    def __enter__(self):
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()

    def round_done(self, server_round: int) -> None:
        if self.enabled and server_round > 0:
            self.bar.update(self.rounds, completed=server_round)

    def attacks_submitted(self, n: int) -> None:
        if self.enabled:
            with self._lock:
                self.bar.update(self.attacks, total=self.bar.tasks[self.attacks].total + n)

    def attack_done(self, _row: LeakageRecord) -> None:
        if self.enabled:
            self.bar.advance(self.attacks)


def _ray_settings(cfg: RunConfig, address: str | None) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU runs: keep Ray from touching GPU env vars
    if address:
        return {"address": address, "logging_level": "ERROR", "log_to_driver": False}
    # A private temp dir per run: a stale cluster file in the shared one makes ray.init hang.
    tmp = tempfile.mkdtemp(prefix="fedsim-ray-")
    return {"num_cpus": cfg.ray.num_cpus or os.cpu_count(), "num_gpus": 0 if cfg.device == "cpu" else None,
            "include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False,
            "object_store_memory": cfg.ray.object_store_memory_mb * 1024 * 1024, "_temp_dir": tmp}


def check_cluster(cfg: RunConfig, address: str) -> None:
    """On an existing cluster: what clients and attacker workers request must exist there."""
    import ray

    have = ray.cluster_resources()
    try:
        check_resources(cpus=have.get("CPU", 0.0), gpus=have.get("GPU", 0.0), client_cpus=cfg.ray.client_cpus,
                        client_gpus=cfg.ray.client_gpus, attacker_gpus=attacker_gpus(cfg) if cfg.attacks else 0.0,
                        attacker_resources=cfg.attack.resources if cfg.attacks else None, custom=have,
                        where=f"the Ray cluster at {address}")
        if cfg.device.startswith("cuda") and have.get("GPU", 0.0) == 0:
            raise ValueError(f"device={cfg.device!r} but the Ray cluster at {address} has no GPU")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def open_run_directory(cfg: RunConfig, mode: str = "new") -> tuple[RunDirectory, int]:
    """The run directory (``mode``: new, resume or overwrite, see RunDirectory) and the last round it finished (-1:
    fresh); a directory that already holds a run without resume/overwrite, or a resume that would change the
    results, is a one-line error before anything starts."""
    store = RunDirectory(cfg.run_dir, mode)
    try:
        return store, _continue_from(store, cfg, mode == "resume")
    except BaseException:
        store.close()
        raise


def _continue_from(store: RunDirectory, cfg: RunConfig, resume: bool) -> int:
    finished = -1
    if resume:
        conflict = resume_conflict(json.loads((store.root / "config.json").read_text()), cfg.model_dump())
        if conflict:
            raise ConfigError(f"--resume: the config differs from the run in {store.root} at {conflict}")
        finished = store.finished_round()
        if finished > 0 and any(d.name == "fedbn" for d in cfg.build_defenses()):
            raise ConfigError("--resume: fedbn keeps each client's BatchNorm layers in its node's memory, which a "
                              "new process cannot restore; rerun from round 0")
        if finished > cfg.federation.rounds:
            raise ConfigError(f"--resume: federation.rounds={cfg.federation.rounds} but {finished} rounds finished")
    store.write_config(cfg.model_dump())
    return finished


def open_session(fed: Federation, store: RunDirectory, finished: int, progress: Progress | None = None) -> Session:
    """The run's auditor (attacker pool on the running Ray) and the backlog of a resumed run resubmitted."""
    progress = progress or Progress(fed.cfg.federation.rounds, enabled=False)
    auditor = Auditor(fed.audit, store, fed.train.ground_truth, on_submit=progress.attacks_submitted, on_row=progress.attack_done)
    auditor.resume()  # before new rounds: stateful attacks see rounds in order
    return Session(fed, store, auditor, progress, finished=finished)


def run_federation(cfg: RunConfig, *, ray_address: str | None = None, mode: str = "new",
                   show_progress: bool = True) -> RunDirectory:
    """Run a configured federation with its attacks; returns the run directory (rows are written as they come).

    This drives Flower's Simulation Runtime in-process (``run_simulation``), so the driver owns Ray (a private temp
    dir, ``--ray-address``), validates before Ray starts and shows progress; ``flwr run .`` runs the same apps
    (``fedsim.flower_app``) under Flower's own process-isolated runtime."""
    import ray
    from flwr.simulation import run_simulation

    fed = prepare(cfg)
    store, finished = open_run_directory(cfg, mode)
    progress = Progress(cfg.federation.rounds, enabled=show_progress)
    address = ray_address or cfg.ray.address
    init_args = _ray_settings(cfg, address)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    session = None
    previous_handler = _silence_flower_on_interrupt()
    try:
        if not ray.is_initialized():
            ray.init(**{k: v for k, v in init_args.items() if v is not None})
        if address:
            check_cluster(cfg, address)
        with progress:
            progress.round_done(max(finished, 0))
            session = open_session(fed, store, finished, progress)
            if finished < cfg.federation.rounds:
                backend = {"client_resources": {"num_cpus": cfg.ray.client_cpus, "num_gpus": cfg.ray.client_gpus},
                           "init_args": {}}
                side = ClientSide.of(fed)
                run_simulation(server_app=make_server_app(session), client_app=make_client_app(lambda _: side),
                               num_supernodes=cfg.federation.num_clients, backend_config=backend)
            else:
                session.done.set()
            session.auditor.close()
        if session.error is not None:
            raise session.error
        if not session.done.is_set():
            raise RuntimeError("the server app did not finish")
    except KeyboardInterrupt:
        if session is not None:
            session.auditor.abort()  # before Ray shuts down: nothing may touch Ray (or start a new one) after it
        raise RunInterrupted(store.root) from None
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        store.close()
        if ray.is_initialized() and not address:
            ray.shutdown()
    return store


def _silence_flower_on_interrupt():
    """A terminal's Ctrl-C reaches the whole process group, so Flower's client actors die with it and Flower's worker
    threads log each lost message with a traceback while the run is being stopped. The run stops with one line of
    its own: Flower's logger goes quiet the moment the interrupt arrives, before the KeyboardInterrupt unwinds.
    Returns the handler to restore (None outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    return previous
