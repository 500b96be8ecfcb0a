"""fedsim's Flower ClientApp: a client process loads its data once and trains the rounds it is sent.

Client actors are separate processes: each loads its data once and caches it, and learns of the run only
its :class:`ClientPlan` (no attack or threat settings beyond the sharing rules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp


from .client import choose_samples, client_round
from .contract import ThreatModel
from .data import ImageData
from .defenses import build_defense
from .models import build_model
from .protocol import ARRAYS, CONFIG, METRICS, reply_content
from .training import TrainConfig
from .federation import DataPlan, Federation

log = logging.getLogger("fedsim")
LOCAL = "fedsim.local-state"  # a client's own values of the layers its defenses keep local, in its node state


# ------------------------------------------------------------------------------------------------------------
# ClientApp


@dataclass(frozen=True)
class ClientPlan:
    """What a client process needs (and all it learns of the run): no attack or threat settings beyond the
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
    """A client process's whole view of the run: its plan and every client's partition (by partition id)."""

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


