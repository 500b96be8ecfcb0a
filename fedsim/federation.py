"""The simulated federation: Flower ClientApp and ServerApp (Message API) and the driver around ``run_simulation``.

The ServerApp runs as a thread of the driver process, so the results store, the evaluator and the attacker pool
pass to it by closure. Client actors are separate processes: each loads its data once and caches it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from strategies.continued import Continued
from strategies.honest_but_curious import HonestButCurious
from strategies.reproducible import ReproducibleSampling
from strategies.secure_aggregation import SecureAggregation

from .audit import AuditPlan, Auditor, PoolSettings
from .checks import check_device, check_resources
from .client import choose_samples, client_round
from .config import ConfigError, ExperimentConfig, resume_conflict
from .contract import LeakageRecord, ModelSpec, ServerView, ThreatModel, check_attacks
from .data import DataError, ImageData, load_dataset, partition_indices
from .defenses import build_defense
from .models import build_model
from .privacy import PrivacyLedger
from .protocol import ARRAYS, CONFIG, METRICS, reply_content
from .results import RunDirectory, model_checksum
from .seeds import attacker_root
from .training import TrainConfig, evaluate_accuracy, float_state, load_public_state

log = logging.getLogger("fedsim")
QUERY_PARTITION = "partition"
LOCAL = "fedsim.local-state"  # a client's own values of the layers its defenses keep local, in its node state


# ------------------------------------------------------------------------------------------------------------
# Data: the same sources in the driver and in every client process


@dataclass(frozen=True)
class DataPlan:
    """Where training and held-out images come from; picklable, so client actors can rebuild the same data."""

    dataset: str
    path: str | None
    test_path: str | None
    image_size: int
    test_fraction: float
    seed: int
    data_dir: str | None  # FEDSIM_DATA_DIR as seen by the driver
    annotations: str | None = None  # ffhq labels
    attribute: str = "gender"

    def train_source(self) -> ImageData:
        return _load(self.dataset, "train", self.path, self.image_size, self.data_dir, self.annotations,
                     self.attribute)

    def test_source(self) -> ImageData | None:
        """A separate held-out split if the source has one, else None (then a fraction is split off)."""
        if self.test_path:
            if not Path(self.test_path).exists():
                raise DataError(f"data.test_path={self.test_path}: no such file or folder")
            return _load(self.test_path, "test", None, self.image_size, self.data_dir)
        if self.dataset in ("cifar10", "cifar100"):
            return _load(self.dataset, "test", self.path, self.image_size, self.data_dir)
        return None

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) indices when one source serves both."""
        perm = np.random.default_rng([self.seed, 3]).permutation(n)
        cut = int(round(n * self.test_fraction))
        return np.sort(perm[cut:]), np.sort(perm[:cut])


@lru_cache(maxsize=4)
def _load(dataset: str, split: str, path: str | None, image_size: int, data_dir: str | None,
          annotations: str | None = None, attribute: str = "gender") -> ImageData:
    if data_dir and not os.environ.get("FEDSIM_DATA_DIR"):
        os.environ["FEDSIM_DATA_DIR"] = data_dir
    return load_dataset(dataset, split, path=path, image_size=image_size, annotations=annotations,
                        attribute=attribute)


@dataclass
class Federation:
    """Everything resolved before Flower starts."""

    cfg: ExperimentConfig
    plan: DataPlan
    train: ImageData
    partitions: list[np.ndarray]  # indices into ``train`` per partition id
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    spec: ModelSpec
    audit: AuditPlan  # the attacker side of the run, built once here


def prepare(cfg: ExperimentConfig, *, checks: bool = True) -> Federation:
    """Resolve data, partitions and the held-out set; with ``checks``, also everything that would otherwise fail
    after Ray has started (checkpoint, device, resources, attack/threat fit). Client processes skip the checks."""
    d = cfg.data
    def absolute(p: str | None) -> str | None:  # client actors may run in another working directory
        return os.path.abspath(os.path.expanduser(p)) if p else None

    dataset = absolute(d.dataset) if Path(d.dataset).expanduser().exists() else d.dataset
    plan = DataPlan(dataset, absolute(d.path), absolute(d.test_path), d.image_size, d.test_fraction, cfg.seed,
                    absolute(os.environ.get("FEDSIM_DATA_DIR")), absolute(d.annotations), d.attribute)
    train = plan.train_source()
    if train.labels is None:
        raise ValueError(f"data.dataset: {train.name} has no labels; victims are classifiers")
    test = plan.test_source()
    if test is None:
        train_idx, test_idx = plan.split(len(train))
        test, pool = train.subset(test_idx), train_idx
    else:
        pool = np.arange(len(train))
    parts = partition_indices(train.labels[pool], cfg.federation.num_clients, d.partition, alpha=d.alpha,
                              seed=cfg.seed, min_partition_size=cfg.client.train_config().num_samples)
    partitions = [pool[p] for p in parts]
    need = cfg.client.train_config().num_samples
    small = [i for i, p in enumerate(partitions) if len(p) < need]
    if small:
        raise ValueError(f"client.num_samples={need} exceeds the partition size of clients {small[:5]}")
    n_test = len(test) if d.test_samples == 0 else min(d.test_samples, len(test))
    idx = np.arange(n_test)
    spec = ModelSpec(cfg.model.name, train.num_classes, train.shape, cfg.model.width, cfg.model.activation)
    fed = Federation(cfg, plan, train, partitions, test.model_input(idx), test.label_tensor(idx), spec,
                     audit_plan(cfg, spec, (train.mean, train.std)))
    if checks:
        _check_before_start(fed)
    return fed


def audit_plan(cfg: ExperimentConfig, spec: ModelSpec, normalization) -> AuditPlan:
    """The attacker side of a configured federation: the server's view, the attacks and where they run."""
    a = cfg.attack
    view = ServerView(spec, normalization, cfg.threat_model(), tuple(d.tag() for d in cfg.build_defenses()))
    pool = PoolSettings(a.executor, a.workers, a.threads, cfg.device, attacker_gpus(cfg) if cfg.attacks else 0.0,
                        dict(a.resources), a.timeout)
    return AuditPlan(view, tuple(cfg.attacks), attacker_root(cfg.seed, a.seed), a.clients_per_round,
                     None if a.rounds is None else frozenset(a.rounds), cfg.seed, pool)


def _check_before_start(fed: Federation) -> None:
    cfg, spec = fed.cfg, fed.spec
    # the victim as the server builds it, so a missing, corrupt or mismatched checkpoint fails now, not after Ray
    victim = build_model(cfg.model.name, spec.num_classes, image_size=spec.image_shape[1], width=cfg.model.width,
                         seed=cfg.seed, checkpoint=cfg.model.checkpoint, activation=cfg.model.activation)
    for i, defense in enumerate(cfg.build_defenses()):
        try:
            defense.check(victim)
        except ValueError as err:
            raise ValueError(f"defenses.{i}: {err}") from None
    if not cfg.ray.address:  # on a cluster the GPUs are the cluster's: checked once Ray is up (check_cluster)
        check_device(cfg.device)
        check_resources(cpus=cfg.ray.num_cpus or os.cpu_count() or 1,
                        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                        client_cpus=cfg.ray.client_cpus, client_gpus=cfg.ray.client_gpus,
                        attacker_gpus=attacker_gpus(cfg) if cfg.attacks else 0.0,
                        attacker_resources=cfg.attack.resources if cfg.attacks else None)
    check_attacks(cfg.attacks, spec, fed.audit.view.threat)


# ------------------------------------------------------------------------------------------------------------
# ClientApp


@dataclass(frozen=True)
class ClientPlan:
    """What a client process needs (and all it learns of the experiment): no attack or threat settings beyond the
    sharing rules, so client actors never import attacker code paths."""

    model_name: str
    width: int
    activation: str
    seed: int
    threads: int
    data: DataPlan
    defenses: tuple[tuple[tuple[str, object], ...], ...]  # defense specs as hashable items
    share_labels: bool


@lru_cache(maxsize=2)
def _client_process_state(plan: ClientPlan) -> tuple[ImageData, torch.nn.Module, list]:
    """Per actor process: the training source, a model instance and the defenses, built once and reused."""
    torch.set_num_threads(plan.threads)  # one actor per CPU: avoid oversubscription
    data = plan.data.train_source()
    model = build_model(plan.model_name, data.num_classes, image_size=data.shape[1], width=plan.width, seed=plan.seed,
                        activation=plan.activation)
    return data, model, [build_defense(dict(spec)) for spec in plan.defenses]


@dataclass(frozen=True)
class ClientSide:
    """A client process's whole view of the experiment: its plan and every client's partition (by partition id)."""

    plan: ClientPlan
    partitions: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, fed: Federation) -> "ClientSide":
        cfg = fed.cfg
        plan = ClientPlan(cfg.model.name, cfg.model.width, cfg.model.activation, cfg.seed,
                          max(1, int(cfg.ray.client_cpus)), fed.plan,
                          tuple(tuple(sorted(d.items())) for d in cfg.defenses), cfg.threat.labels == "known")
        return cls(plan, tuple(fed.partitions))


def make_client_app(side_of: Callable[[Context], ClientSide]) -> ClientApp:
    """The ClientApp; ``side_of`` gives a client process its view (by closure under ``fedsim run``, rebuilt from the
    run config under ``flwr run``)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({METRICS: MetricRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        side = side_of(context)
        plan = side.plan
        threat = ThreatModel(labels="known" if plan.share_labels else "recovered")
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content[CONFIG]["server-round"])
        sent = TrainConfig.from_record(dict(msg.content[CONFIG]))
        data, model, defenses = _client_process_state(plan)
        global_state = {k: torch.from_numpy(v.numpy().copy()) for k, v in msg.content[ARRAYS].items()}
        ids = choose_samples(side.partitions[pid], sent.num_samples, plan.seed, server_round, pid)
        local = ({k: torch.from_numpy(v.numpy().copy()) for k, v in context.state[LOCAL].items()}
                 if LOCAL in context.state else None)
        reply = client_round(model, global_state, data, ids, sent, defenses, threat, seed=plan.seed,
                             server_round=server_round, client_id=pid, local_state=local)
        if reply.local_state:  # FedBN: the node keeps its own layers for its next round (Flower's node state)
            context.state[LOCAL] = ArrayRecord({k: v.contiguous() for k, v in reply.local_state.items()})
        return Message(reply_content(reply, pid, global_state), reply_to=msg)

    return app


# ------------------------------------------------------------------------------------------------------------
# ServerApp


@dataclass
class Session:
    """Objects the ServerApp thread shares with the driver."""

    fed: Federation
    store: RunDirectory
    auditor: Auditor
    progress: "Progress | None" = None
    finished: int = -1  # the last round a resumed run had finished (-1: a fresh run)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RunInterrupted(Exception):
    """Ctrl-C: the run stopped; every finished round and row is in its run directory, ``--resume`` continues."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"interrupted; finished rounds and rows are in {root}")
        self.root = root


class FederationSizeError(ConfigError):
    """The Flower federation has a different number of nodes than the experiment has clients."""


def _wait_for_nodes(grid: Grid, expected: int, timeout: float = 300.0, settle: float = 5.0) -> list[int]:
    """The Simulation Runtime starts the ServerApp before every virtual node is registered: wait for all of them.
    A count that stays put at another size (a ``flwr run`` federation of the wrong size) is an error, not a hang."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while len(nodes := list(grid.get_node_ids())) != expected:
        now = time.monotonic()
        if len(nodes) != last:
            last, since = len(nodes), now
        elif last > 0 and now - since > settle:
            raise FederationSizeError(
                f"federation.num_clients={expected} but the Flower federation has {last} nodes "
                f"(flwr run: --federation-config num-supernodes={expected})")
        if now > deadline:
            raise TimeoutError(f"only {len(nodes)} of {expected} client nodes registered after {timeout} s")
        time.sleep(0.2)
    return nodes


def _partition_map(grid: Grid, nodes: list[int]) -> dict[int, int]:
    """Ask every node for its stable partition id (node ids are random per run)."""
    messages = [Message(RecordDict({CONFIG: ConfigRecord({"ask": QUERY_PARTITION})}), dst_node_id=n,
                        message_type="query") for n in nodes]
    replies = grid.send_and_receive(messages, timeout=600)
    mapping = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the partition query: {reply.error.reason}")
        mapping[reply.metadata.src_node_id] = int(reply.content[METRICS]["partition-id"])
    return mapping


def make_server_app(session: Session) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            _server_main(grid, session)
        except BaseException as err:  # noqa: BLE001 - surfaced by the driver after Flower returns
            session.error = err
            log.error("server failed: %s", err)
        finally:
            session.done.set()

    return app


def _server_main(grid: Grid, session: Session) -> None:
    fed, cfg = session.fed, session.fed.cfg
    nodes = _wait_for_nodes(grid, cfg.federation.num_clients)
    partition_of = _partition_map(grid, nodes)
    model = build_model(cfg.model.name, fed.spec.num_classes, image_size=fed.spec.image_shape[1],
                        width=cfg.model.width, seed=cfg.seed, checkpoint=cfg.model.checkpoint,
                        activation=cfg.model.activation)
    initial = float_state(model)
    start = max(session.finished, 0)
    if session.finished >= 0:  # resume: the global model the server held after its last finished round
        initial = {k: torch.from_numpy(v) for k, v in session.store.checkpoints.load(start).items()}

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # FedAvg warns that client-side evaluation is off: it is, on purpose
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
                   min_available_nodes=1)
    flwr_log.setLevel(level)
    def client_failed(server_round: int, client_id: int, reason: str) -> None:
        log.warning("client %d failed in round %d: %s", client_id, server_round, reason)
        session.store.failures.append({"round": server_round, "client_id": client_id, "reason": reason})

    strategy = ReproducibleSampling(inner, partition_of, cfg.federation.clients_per_round, cfg.seed,
                                    fail_on_client_error=cfg.federation.on_client_error == "stop",
                                    on_failure=client_failed, poisson=cfg.federation.sampling == "poisson")
    # it sees replies exactly as they arrive, and takes the evaluator's side channel off them
    strategy = HonestButCurious(strategy, session.auditor.observe)
    if cfg.threat.secure_aggregation:  # outermost: inside it, the tee and FedAvg see only the round's aggregate
        strategy = SecureAggregation(strategy, partition_of)

    strategy = Continued(strategy, start)  # rounds keep their numbers after a resume
    mechanisms = cfg.privacy_mechanisms()
    ledger = PrivacyLedger(mechanisms, cfg.privacy.delta) if mechanisms else None
    for _ in range(start if ledger else 0):  # resume: the rounds already released
        ledger.advance()

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + start
        if server_round == session.finished:  # the resumed-from round: its row and checkpoint exist
            return None
        if ledger is not None and server_round > 0:
            ledger.advance()  # this round's updates were released
        numpy_arrays = {k: v.numpy() for k, v in arrays.items()}
        session.store.checkpoints.save(server_round, numpy_arrays)  # before the row: a row implies its checkpoint
        load_public_state(model, {k: torch.from_numpy(v.copy()) for k, v in numpy_arrays.items()})
        acc, loss = evaluate_accuracy(model, fed.test_inputs, fed.test_labels)
        session.store.rounds.append({"round": server_round, "test_accuracy": acc, "test_loss": loss,
                                     "model_checksum": model_checksum(numpy_arrays),
                                     "epsilon": ledger.epsilon() if ledger is not None else math.nan,
                                     "time": time.time()})
        if session.progress is not None:
            session.progress.round_done(server_round)
        return MetricRecord({"accuracy": acc, "loss": loss})

    train_config = ConfigRecord(cfg.client.train_config().to_record())
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                   num_rounds=cfg.federation.rounds - start, train_config=train_config, evaluate_fn=evaluate)
    session.auditor.drain()  # Flower shuts Ray down when main returns: collect every attack first


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


def _ray_settings(cfg: ExperimentConfig, address: str | None) -> dict:
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


def attacker_gpus(cfg: ExperimentConfig) -> float:
    """GPUs each attacker worker requests: ``attack.gpus_per_worker``, else a share of one GPU on cuda."""
    if cfg.attack.gpus_per_worker is not None:
        return cfg.attack.gpus_per_worker
    return 1.0 / cfg.attack.workers if cfg.device.startswith("cuda") else 0.0


def check_cluster(cfg: ExperimentConfig, address: str) -> None:
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


def open_run_directory(cfg: ExperimentConfig, mode: str = "new") -> tuple[RunDirectory, int]:
    """The run directory (``mode``: new, resume or overwrite, see RunDirectory) and the last round it finished (-1:
    fresh); a directory that already holds a run without resume/overwrite, or a resume that would change the
    results, is a one-line error before anything starts."""
    store = RunDirectory(cfg.run_dir, mode)
    try:
        return store, _continue_from(store, cfg, mode == "resume")
    except BaseException:
        store.close()
        raise


def _continue_from(store: RunDirectory, cfg: ExperimentConfig, resume: bool) -> int:
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


def run_experiment(cfg: ExperimentConfig, *, ray_address: str | None = None, mode: str = "new",
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
        store.close()
        if ray.is_initialized() and not address:
            ray.shutdown()
    return store
