"""fedsim's Flower ServerApp: waits for the federation, maps nodes to partitions, runs the strategies (reproducible
sampling, the honest-but-curious wrapper, secure aggregation) and records every round.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from strategies.continued import Continued
from strategies.honest_but_curious import HonestButCurious
from strategies.reproducible import ReproducibleSampling
from strategies.secure_aggregation import SecureAggregation

from .audit import Auditor
from .config import ConfigError
from .models import build_model
from .privacy import PrivacyLedger
from .protocol import CONFIG, METRICS
from .results import RunDirectory, model_checksum
from .training import evaluate_accuracy, float_state, load_public_state
from .federation import Federation

if TYPE_CHECKING:
    from .driver import Progress

log = logging.getLogger("fedsim")
QUERY_PARTITION = "partition"


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
    """The Flower federation has a different number of nodes than the run config has clients."""


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


