"""Audit a user's own Flower app: what a curious server learns from its clients' replies.

Three public pieces, added to an existing app by a few lines:

- :func:`audited` (ServerApp): ``strategy = audited(FedAvg(...), context)`` wraps any Message-API strategy as the
  outermost layer. It reads the audit file the run config key ``fedsim-audit`` names (absent or empty: the strategy
  comes back unchanged), sees each reply as it arrives, hands the attacked ones to fedsim's :class:`Auditor` (attacks
  on Ray, rows in a fedsim run directory) and passes the replies on without the side channel, so the strategy
  aggregates exactly what it would without the audit.
- :func:`audit_mod` (ClientApp mod, first in ``mods``): attaches the client's partition id and the batches recorded
  during training as the evaluator's side channel (see :mod:`fedsim.protocol`). Off unless the run is audited.
- :func:`record_batch` (the user's train loop): records each batch as it goes into the model. Without it, rows are
  written with the update-fit numbers and the status ``no ground truth``.

The server side knows of the clients' training only what the audit file declares (``[recipe]``: literals,
``config:KEY`` from the ConfigRecord the server sent, ``run:KEY`` from the run config); the attacker replays that
recipe. The side channel carries the clients' training images to the server process for scoring: audit a test
federation, never one with other people's data on a network you do not control.
"""

from __future__ import annotations

import contextvars
import sys
import tomllib
import hashlib
import inspect
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from pydantic import Field, ValidationError, field_validator, model_validator

from strategies.honest_but_curious import HonestButCurious

from ..config import Section, ThreatConfig, _construct, read_toml
from ..contract import ModelSpec, ServerView, ThreatModel, build_attack, check_attacks
from ..models import build_model
from ..protocol import SIDE, RecordKeys, ReplyError, arrays_to_numpy, encode_batches
from ..registry import validation_problems
from ..results import RunDirectory, model_checksum
from ..seeds import attacker_root
from ..training import TrainConfig, load_public_state
from .auditor import AuditPlan, Auditor, PoolSettings

log = logging.getLogger("fedsim")
RUN_CONFIG_KEY = "fedsim-audit"  # the run config key naming the audit file


class AuditError(ValueError):
    """A bad audit setting, found before round 1: one line naming the key and what to set."""


# ------------------------------------------------------------------------------------------------------------
# The audit file


Declared = float | int | bool | str  # a literal, or "config:KEY" / "run:KEY"


class RecipeFile(Section):
    """What the server knows of the clients' local training. Each value: a literal, ``config:KEY`` (read from the
    ConfigRecord the server sent that client) or ``run:KEY`` (the run config)."""

    lr: Declared
    local_epochs: Declared = 1
    batch_size: Declared = 32
    mode: Literal["fedavg", "fedsgd"] = "fedavg"  # fedsgd: one gradient step on all the client's examples
    optimizer: Literal["sgd"] = "sgd"  # plain SGD is what the attacker replays
    loss: Literal["cross_entropy"] = "cross_entropy"
    bn_mode: Literal["train", "eval"] = "train"

    @field_validator("lr", "local_epochs", "batch_size")
    @classmethod
    def _reference(cls, value):
        if isinstance(value, str) and not value.startswith(("config:", "run:")):
            raise ValueError(f"{value!r} is neither a number nor 'config:KEY' / 'run:KEY'")
        return value


class DataFile(Section):
    """The clients' model inputs: shape and normalisation, so reconstructions are scored in [0, 1]."""

    shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W) of one input
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    num_classes: int | None = Field(default=None, ge=2)  # None: the model's output width

    @model_validator(mode="after")
    def _channels(self):
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.shape[0]:
                raise ValueError(f"{key} has {len(getattr(self, key))} values for {self.shape[0]} channels")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self


class KeysFile(Section):
    """Record keys of the strategy's messages (Flower's FedAvg: ``arrayrecord_key``, ``weighted_by_key``)."""

    arrays: str = "arrays"
    config: str = "config"
    metrics: str = "metrics"
    num_examples: str = "num-examples"


class AttackerFile(Section):
    """Where the attacks run: on the simulation's Ray; in the deployment runtime, a local Ray on the ServerApp's
    machine or the cluster at ``ray_address``."""

    executor: Literal["ray", "inline"] = "ray"
    workers: int = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1)
    device: str = "cpu"
    gpus_per_worker: float = Field(default=0.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0.0)
    ray_address: str | None = None
    seed: int = 0


class AuditFile(Section):
    model: str  # "package.module:Net": the app's nn.Module class or a factory
    model_args: dict[str, Any] = Field(default_factory=dict)
    attacks: list[dict[str, Any]] = Field(default_factory=list)
    attacked_per_round: int | None = Field(default=1, ge=0)  # None: every reply
    rounds: list[int] | None = None  # None: every round
    output_dir: str = "fedsim-audits"  # run directories go here, one per Flower run
    name: str | None = None  # the run directory's name (default: run-<Flower run id>)
    overwrite: bool = False  # replace a run already in output_dir/name
    recipe: RecipeFile
    data: DataFile = Field(default_factory=DataFile)
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    keys: KeysFile = Field(default_factory=KeysFile)
    attacker: AttackerFile = Field(default_factory=AttackerFile)

    @field_validator("attacks")
    @classmethod
    def _buildable(cls, specs):
        for i, spec in enumerate(specs):
            _construct(build_attack, spec, f"attacks.{i}")
        return specs

    @field_validator("model")
    @classmethod
    def _import_path(cls, value):
        if ":" not in value:
            raise ValueError(f"{value!r}: expected the import path of the app's model, e.g. 'myapp.task:Net'")
        return value

    @model_validator(mode="after")
    def _threat(self):
        if self.threat.secure_aggregation:
            raise ValueError("threat.secure_aggregation: a wrapped Flower strategy aggregates itself; not supported")
        return self

    @classmethod
    def load(cls, path: Path) -> "AuditFile":
        raw = read_toml(path, "audit")
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            key, problem = validation_problems(err, cls)[0]
            raise AuditError(f"audit file {path}: {key}: {problem}") from None

    # -- derived, once per run ------------------------------------------------------------------------------
    def threat_model(self) -> ThreatModel:
        t = self.threat
        return ThreatModel(labels=t.labels, label_method=t.label_method, bn_stats_shared=bool(t.bn_stats_shared),
                           hyperparameters_known=t.hyperparameters_known)

    def model_spec(self, where: Path) -> ModelSpec:
        """The app's model as the server builds it (imported now: a bad path fails before round 1)."""
        try:
            model = build_model(self.model, 0, args=self.model_args)
        except (ValueError, TypeError) as err:
            raise AuditError(f"audit file {where}: model: {err}") from None
        num_classes = self.data.num_classes
        if num_classes is None:
            with torch.no_grad():
                try:
                    num_classes = int(model.eval()(torch.zeros(2, *self.data.shape)).shape[-1])
                except Exception as err:  # noqa: BLE001 - the user's forward: say what did not fit
                    raise AuditError(f"audit file {where}: data.shape={list(self.data.shape)} does not fit "
                                     f"{self.model}: {type(err).__name__}: {err}".splitlines()[0]) from None
        return ModelSpec(self.model, num_classes, tuple(self.data.shape),
                         args=tuple(sorted(self.model_args.items())))


class DeclaredRecipe:
    """The audit file's recipe with ``run:`` values resolved: per reply, ``config:`` values from what was sent."""

    FIELDS = {"lr": float, "local_epochs": int, "batch_size": int}

    def __init__(self, recipe: RecipeFile, run_config: dict, where: Path) -> None:
        self.recipe = recipe
        self.fixed: dict[str, Any] = {}
        self.from_config: dict[str, str] = {}
        for name, cast in self.FIELDS.items():
            value = getattr(recipe, name)
            if isinstance(value, str) and value.startswith("config:"):
                self.from_config[name] = value.removeprefix("config:")
                continue
            if isinstance(value, str):  # run:KEY
                key = value.removeprefix("run:")
                if key not in run_config:
                    raise AuditError(f"audit file {where}: recipe.{name} = {value!r} but the run config has no "
                                     f"{key!r} (it has {sorted(run_config)})")
                value = run_config[key]
            self.fixed[name] = self._cast(name, cast, value, where)

    @staticmethod
    def _cast(name: str, cast, value, where) -> Any:
        try:
            out = cast(value)
        except (TypeError, ValueError):
            raise AuditError(f"audit file {where}: recipe.{name}: {value!r} is not a {cast.__name__}") from None
        if out <= 0:
            raise AuditError(f"audit file {where}: recipe.{name}: must be positive, got {value!r}")
        return out

    def check_sent(self, config: dict) -> None:
        """Round 1: every ``config:`` key is in the ConfigRecord the server sends (else nothing could replay)."""
        missing = [f"{name} = 'config:{key}'" for name, key in self.from_config.items() if key not in config]
        if missing:
            raise AuditError(f"audit file: recipe.{missing[0]} but the strategy's train ConfigRecord has no such "
                             f"key (it has {sorted(config)})")

    def train_config(self, sent: dict, num_examples: int) -> dict:
        values = dict(self.fixed)
        for name, key in self.from_config.items():
            if key not in sent:
                raise ReplyError(f"recipe.{name}: the ConfigRecord sent has no {key!r}")
            values[name] = self._cast(name, self.FIELDS[name], sent[key], "(sent config)")
        fedsgd = self.recipe.mode == "fedsgd"
        return TrainConfig(mode=self.recipe.mode, lr=values["lr"], epochs=1 if fedsgd else values["local_epochs"],
                           batch_size=num_examples if fedsgd else min(values["batch_size"], num_examples),
                           num_samples=num_examples, shuffle=False, bn_mode=self.recipe.bn_mode).to_record()


# ------------------------------------------------------------------------------------------------------------
# Server side


def app_directory(start: str | Path) -> Path:
    """The Flower app a file belongs to: the nearest folder above it holding a pyproject.toml."""
    path = Path(start).resolve()
    for folder in [path.parent, *path.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def audited(strategy: Strategy, context: Context, *, app_dir: str | Path | None = None) -> Strategy:
    """``strategy`` as an honest-but-curious server's, audited as the audit file named by the run config key
    ``fedsim-audit`` says; that key absent or empty: ``strategy`` itself. A relative audit-file path resolves
    against ``app_dir`` (default: the app the caller's file belongs to, which Flower ships in the FAB)."""
    name = str(context.run_config.get(RUN_CONFIG_KEY, "") or "").strip()
    if not name:
        return strategy
    if app_dir is None:
        app_dir = app_directory(inspect.stack()[1].filename)
    path = Path(name).expanduser()
    path = path if path.is_absolute() else Path(app_dir) / path
    if not path.is_file():
        raise AuditError(f"run config {RUN_CONFIG_KEY}={name!r}: no audit file at {path}; set the key to an "
                         f"audit TOML (relative to {app_dir}) or to \"\" to run unaudited")
    return AuditedStrategy(strategy, AuditFile.load(path), context, audit_file=path, app_dir=Path(app_dir))


class AuditedStrategy(HonestButCurious):
    """The user's strategy inside the curious server's tee (made by :func:`audited`).

    Before round 1 everything that can be checked is: the audit file, the model import, the attacks, the run
    directory; at round 1's configure (before any client trains) the model against the arrays sent and the recipe
    against the ConfigRecord sent. From then on the audit never stops or changes the user's federation: a reply it
    cannot read and an auditor failure are one warning each, and the replies reach the strategy as they came.
    """

    def __init__(self, inner: Strategy, settings: AuditFile, context: Context, *, audit_file: Path,
                 app_dir: Path) -> None:
        super().__init__(inner, self._observe)
        self.settings, self.app_dir = settings, app_dir
        self.recipe = DeclaredRecipe(settings.recipe, dict(context.run_config), audit_file)
        spec = settings.model_spec(audit_file)
        threat = settings.threat_model()
        try:
            check_attacks(settings.attacks, spec, threat)
        except ValueError as err:
            raise AuditError(f"audit file {audit_file}: {err}") from None
        d, a = settings.data, settings.attacker
        view = ServerView(spec, (tuple(d.mean), tuple(d.std)), threat)
        pool = PoolSettings(a.executor, a.workers, a.threads, a.device, a.gpus_per_worker, dict(a.resources),
                            a.timeout, python_path=(str(app_dir),))
        k = settings.keys
        self.plan = AuditPlan(view, tuple(settings.attacks), attacker_root(a.seed, None), settings.attacked_per_round,
                              None if settings.rounds is None else frozenset(settings.rounds), a.seed, pool,
                              keys=RecordKeys(k.arrays, k.config, k.metrics, k.num_examples), recipe=self.recipe)
        root = Path(settings.output_dir).expanduser()
        root = (root if root.is_absolute() else Path.cwd() / root) / (settings.name or f"run-{context.run_id}")
        self.store = RunDirectory(root, "overwrite" if settings.overwrite else "new")
        self.store.write_config({"command": "fedsim audit", "audit_file": str(audit_file),
                                 "run_id": int(context.run_id), "run_config": dict(context.run_config),
                                 **settings.model_dump(mode="json")})
        self.auditor: Auditor | None = None
        self._started_ray = False
        self._first_configure = True
        log.info("fedsim audit: results in %s", root)

    # -- the auditor comes up with the first replies (in the simulation runtime Flower's Ray is up by then) ---
    def _auditor(self) -> Auditor:
        if self.auditor is None:
            if self.plan.pool.executor == "ray":
                self._ensure_ray()
            self.auditor = Auditor(self.plan, self.store, _no_dataset)
        return self.auditor

    def _ensure_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self.settings.attacker.ray_address
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:  # the deployment runtime: a private Ray on the ServerApp's machine, for the attacker alone
            ray.init(num_cpus=self.plan.pool.workers * self.plan.pool.threads, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="fedsim-audit-"))
        self._started_ray = True

    def _observe(self, server_round: int, exchanges) -> None:
        if not self.plan.attacks_round(server_round):
            return
        try:
            self._auditor().observe(server_round, exchanges)
        except Exception as err:  # noqa: BLE001 - the audit never fails the user's federation
            message = f"round {server_round}: the audit failed, this round is not audited: {type(err).__name__}: {err}"
            if self.auditor is not None:
                self.auditor.warn_once(message.splitlines()[0])
            else:
                log.warning("fedsim audit: %s", message.splitlines()[0])

    # -- round 1: what can be checked before any client trains -------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        if self._first_configure and messages:
            self._first_configure = False
            self.check_round_one(messages[0])
        return messages

    def check_round_one(self, message: Message) -> None:
        """The first train message against the audit file: its record keys, the model, the recipe."""
        keys = self.plan.keys
        content = message.content
        if keys.arrays not in content.array_records:
            raise AuditError(f"audit file: keys.arrays = {keys.arrays!r} but the strategy sends the model under "
                             f"{sorted(content.array_records)}")
        if keys.config not in content.config_records:
            raise AuditError(f"audit file: keys.config = {keys.config!r} but the strategy sends its config under "
                             f"{sorted(content.config_records)}")
        state = {k: torch.from_numpy(v.copy()) for k, v in arrays_to_numpy(content[keys.arrays]).items()
                 if np.issubdtype(v.dtype, np.floating)}
        model = build_model(self.plan.view.model.name, 0, args=dict(self.plan.view.model.args))
        try:
            load_public_state(model, state)
        except ValueError as err:
            raise AuditError(f"audit file: model = {self.settings.model!r}: {err}") from None
        self.recipe.check_sent(dict(content[keys.config].items()))

    # -- the run ------------------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None):
        """The strategy's own ``start``; each round's global model is also recorded (checksum and whatever the
        app's ``evaluate_fn`` returns: ``accuracy`` / ``loss``) and every attack finishes before it returns."""

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            metrics = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            values = dict(metrics.items()) if metrics is not None else {}
            self.store.rounds.append({"round": server_round,
                                      "test_accuracy": float(values.get("accuracy", math.nan)),
                                      "test_loss": float(values.get("loss", math.nan)),
                                      "model_checksum": model_checksum(arrays_to_numpy(arrays)),
                                      "epsilon": math.nan, "time": time.time()})
            return metrics

        try:
            return super().start(grid, initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                 train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate)
        finally:
            self.close()

    def close(self) -> None:
        """Every attack finished and its row written, the run directory released."""
        try:
            if self.auditor is not None:
                self.auditor.drain()
                self.auditor.close()
        finally:
            self.store.close()
            if self._started_ray:
                import ray

                ray.shutdown()
        log.info("fedsim audit: results in %s", self.store.root)


def _no_dataset(ids):
    raise ValueError("this run's ground truth is what its clients recorded (fedsim.audit.record_batch)")


# ------------------------------------------------------------------------------------------------------------
# Client side


class _Recorder:
    """The batches one client's train call recorded: distinct samples and, per position trained on, which one."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}
        self.images: list[np.ndarray] = []
        self.labels: list[int] = []
        self.steps: list[int] = []

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        x = images.detach().to("cpu", torch.float32).numpy()
        y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"record_batch: {len(x)} images but {len(y)} labels")
        for image, label in zip(x, y):
            key = hashlib.sha1(image.tobytes() + int(label).to_bytes(8, "little", signed=True)).digest()
            if key not in self.index:  # the same sample again (a later epoch): the same ground truth
                self.index[key] = len(self.images)
                self.images.append(image)
                self.labels.append(int(label))
            self.steps.append(self.index[key])

    def record(self, partition_id: int) -> ConfigRecord:
        record = ConfigRecord({"partition-id": int(partition_id)})
        if self.images:
            record["batches"] = encode_batches(np.stack(self.images), np.asarray(self.labels, dtype=np.int64),
                                               np.asarray(self.steps, dtype=np.int64))
        return record


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("fedsim_audit_recorder", default=None)


def record_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Record one training batch as it goes into the model (call it in the train loop). A no-op unless
    :func:`audit_mod` wraps the running train call of an audited run."""
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.add(images, labels)


@lru_cache(maxsize=8)
def _records_anything(name: str) -> bool:
    """Whether the audit file named by the run config attacks anything (no attacks, or none a round: nothing to
    score, so clients need not record). Looked for as the server does, against the app directory, which Flower
    puts on this process's path; not found or not readable: record (the server decides)."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path(entry) / path for entry in sys.path if entry] + [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                raw = tomllib.loads(candidate.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                return True
            return bool(raw.get("attacks", [])) and raw.get("attacked_per_round", 1) != 0
    return True


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod: on train messages of an audited run, records the batches the train function passes to
    :func:`record_batch` and attaches them with the client's partition id (``node_config["partition-id"]``) as
    the side channel. Put it first in ``mods`` so no other mod sees the side channel."""
    name = str(context.run_config.get(RUN_CONFIG_KEY, "") or "").strip()
    if msg.metadata.message_type != MessageType.TRAIN or not name:
        return call_next(msg, context)
    recorder = _Recorder()
    token = _RECORDER.set(recorder if _records_anything(name) else None)
    try:
        reply = call_next(msg, context)
    finally:
        _RECORDER.reset(token)
    if reply.has_error():
        return reply
    # a node started without a partition id (deployment runtime): its node id, which is stable for the run
    partition = context.node_config.get("partition-id", context.node_id % (1 << 31))
    reply.content[SIDE] = recorder.record(int(partition))
    return reply


__all__ = ["AuditError", "AuditFile", "AuditedStrategy", "audit_mod", "audited", "record_batch", "RUN_CONFIG_KEY"]
