"""fedsim as a Flower app: ``flwr run .`` runs an experiment under Flower's own (process-isolated) runtime.

pyproject.toml names these components (``[tool.flwr.app.components]``) and the run config they read
(``[tool.flwr.app.config]``):

- ``experiment``: the experiment TOML (relative paths resolve against the working directory of Flower's runtime,
  then against this source tree);
- ``set``: overrides in ``fedsim run --set`` syntax, separated by spaces (``"federation.rounds=2 seed=3"``);
- ``resume``: continue the run directory from its last finished round, as ``fedsim run --resume``.

The ServerApp runs in Flower's simulation process, which also starts Ray for the ClientApps: it waits for that Ray,
then places the attacker pool on it and writes the same run directory as ``fedsim run``. Client processes rebuild
their view (data plan, partitions, defenses) from the same run config, once per process.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from functools import lru_cache
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .config import ConfigError, ExperimentConfig, load_config
from .federation import ClientSide, _server_main, make_client_app, open_run_directory, open_session, prepare

log = logging.getLogger("fedsim")
SOURCE_TREE = Path(__file__).resolve().parents[1]


def experiment_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    if (SOURCE_TREE / path).exists():
        return SOURCE_TREE / path
    raise FileNotFoundError(f"run config experiment={name!r}: no such file (in {os.getcwd()} or {SOURCE_TREE})")


@lru_cache(maxsize=4)
def _config(experiment: str, overrides: str) -> ExperimentConfig:
    return load_config(experiment_path(experiment), shlex.split(overrides))


def config_of(run_config: dict) -> ExperimentConfig:
    """The experiment a run config names, with its overrides applied (one line per bad key, as ``fedsim run``)."""
    unknown = sorted(set(run_config) - {"experiment", "set", "resume"})
    if unknown:
        raise ValueError(f"run config: unknown key {unknown[0]!r} (expected experiment, set, resume)")
    return _config(str(run_config.get("experiment", "")), str(run_config.get("set", "")))


# ------------------------------------------------------------------------------------------------------------


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        _main(grid, context)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # one line in Flower's run log; the run fails
        log.error("fedsim: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise


def _main(grid: Grid, context: Context) -> None:
    import ray

    cfg = config_of(dict(context.run_config))
    fed = prepare(cfg)
    store, finished = open_run_directory(cfg, bool(context.run_config.get("resume", False)))
    try:
        deadline = time.monotonic() + 600
        while not ray.is_initialized():  # Flower starts Ray for the ClientApps after this thread: use that Ray
            if time.monotonic() > deadline:
                raise TimeoutError("Flower's runtime did not start Ray within 600 s")
            time.sleep(0.2)
        session = open_session(fed, store, finished)
        try:
            if finished < cfg.federation.rounds:
                _server_main(grid, session)
            elif session.pool is not None:
                session.pool.drain()
        finally:
            if session.pool is not None:
                session.pool.close()
    finally:
        store.close()
    log.info("fedsim: results in %s", store.root)


@lru_cache(maxsize=2)
def _client_side(experiment: str, overrides: str) -> ClientSide:
    return ClientSide.of(prepare(_config(experiment, overrides), checks=False))


def _side_of(context: Context) -> ClientSide:
    config_of(dict(context.run_config))  # same validation as the server
    return _client_side(str(context.run_config.get("experiment", "")), str(context.run_config.get("set", "")))


client_app = make_client_app(_side_of)
