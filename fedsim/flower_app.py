"""fedsim as a Flower app: ``flwr run .`` runs a fedsim run config under Flower's own (process-isolated) runtime.

pyproject.toml names these components (``[tool.flwr.app.components]``) and the run config they read
(``[tool.flwr.app.config]``):

- ``config``: the run config TOML (relative paths resolve against the working directory of Flower's runtime,
  then against this source tree);
- ``set``: overrides in ``fedsim run --set`` syntax, separated by spaces (``"federation.rounds=2 seed=3"``);
- ``resume``: continue the run directory from its last finished round, as ``fedsim run --resume``;
- ``overwrite``: replace the run already in the run directory, as ``fedsim run --overwrite`` (without either, a run
  directory that holds a run is refused).

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

from .config import ConfigError, RunConfig, load_config
from .clientapp import ClientSide, make_client_app
from .driver import open_run_directory, open_session
from .federation import prepare
from .serverapp import _server_main

log = logging.getLogger("fedsim")
SOURCE_TREE = Path(__file__).resolve().parents[1]


def config_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    if (SOURCE_TREE / path).exists():
        return SOURCE_TREE / path
    raise FileNotFoundError(f"run config config={name!r}: no such file (in {os.getcwd()} or {SOURCE_TREE})")


RUN_CONFIG_KEYS = ("config", "set", "resume", "overwrite")
FLWR_HINT = "set the run config resume=true to continue it, overwrite=true to replace it, or another name"


class RunFailed(RuntimeError):
    """fedsim's one-line reason a ``flwr run`` failed (raised without fedsim's own stack)."""


@lru_cache(maxsize=4)
def _config(path: str, overrides: str) -> RunConfig:
    return load_config(config_path(path), shlex.split(overrides))


def config_of(run_config: dict) -> RunConfig:
    """The fedsim run config a Flower run config names, with its overrides applied (one line per bad key, as ``fedsim run``)."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"run config: unknown key {unknown[0]!r} (expected {', '.join(RUN_CONFIG_KEYS)})")
    return _config(str(run_config.get("config", "")), str(run_config.get("set", "")))


# ------------------------------------------------------------------------------------------------------------


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        _main(grid, context)
    except (ConfigError, ValueError, FileNotFoundError) as err:  # one line in Flower's run log; the run fails
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.error("fedsim: %s", line)
        # Flower logs the exception it receives with its traceback: give it this line alone, not fedsim's stack.
        raise RunFailed(line) from None


def _main(grid: Grid, context: Context) -> None:
    import ray

    from .results import check_open, open_mode

    cfg = config_of(dict(context.run_config))
    run_config = dict(context.run_config)
    mode = open_mode(bool(run_config.get("resume", False)), bool(run_config.get("overwrite", False)),
                     flags="run config resume and overwrite")
    check_open(cfg.run_dir, mode, hint=FLWR_HINT, resume_flag="resume=true")  # before any data is read
    fed = prepare(cfg)
    store, finished = open_run_directory(cfg, mode)
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
            else:
                session.auditor.drain()
        finally:
            session.auditor.close()
    finally:
        store.close()
    log.info("fedsim: results in %s", store.root)


@lru_cache(maxsize=2)
def _client_side(path: str, overrides: str) -> ClientSide:
    return ClientSide.of(prepare(_config(path, overrides), checks=False))


def _side_of(context: Context) -> ClientSide:
    config_of(dict(context.run_config))  # same validation as the server
    return _client_side(str(context.run_config.get("config", "")), str(context.run_config.get("set", "")))


client_app = make_client_app(_side_of)
