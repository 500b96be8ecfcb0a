"""One client's round, independent of Flower: pick samples, train locally, defend the update, build the reply.

The Flower ClientApp and the single-update mode (``fedsim attack``) both call :func:`client_round`, so the
federation and the fast research path produce the same updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .contract import AuditRecord, ObservedUpdate, ReplyView, ServerView, ThreatModel
from .data import ImageData
from .defenses import Defense, DefenseContext, apply_pipeline
from .seeds import round_seed
from .training import TrainConfig, float_state, load_public_state, local_train, step_schedule


@dataclass
class ClientReply:
    state: dict[str, torch.Tensor]  # global state + defended update (parameters) and new BN buffers
    num_examples: int
    train_loss: float
    shared: dict = field(default_factory=dict)
    audit: AuditRecord | None = None
    local_state: dict[str, torch.Tensor] = field(default_factory=dict)  # what never leaves the client (FedBN)


def choose_samples(partition: np.ndarray, num_samples: int, seed: int, server_round: int, client_id: int) -> np.ndarray:
    """The round's local samples: a fresh seeded draw from the client's partition (without replacement)."""
    if num_samples > len(partition):
        raise ValueError(f"client {client_id} has {len(partition)} samples, fewer than client.num_samples={num_samples}")
    rng = np.random.default_rng(round_seed(seed, server_round, client_id, 0))
    return np.sort(rng.choice(partition, size=num_samples, replace=False))


def client_round(model: nn.Module, global_state: dict[str, torch.Tensor], data: ImageData, sample_ids: np.ndarray,
                 cfg: TrainConfig, defenses: list[Defense], threat: ThreatModel, *, seed: int, server_round: int,
                 client_id: int, local_state: dict[str, torch.Tensor] | None = None) -> ClientReply:
    """``local_state``: this client's own values of the keys its defenses keep local (FedBN), from its last round
    (None: first round, the global values)."""
    load_public_state(model, global_state)
    local_keys = set().union(*(d.local_keys(model) for d in defenses)) if defenses else set()
    if local_state:
        model.load_state_dict({**model.state_dict(), **{k: v for k, v in local_state.items() if k in local_keys}})
    inputs, labels = data.model_input(sample_ids), data.label_tensor(sample_ids)
    schedule = step_schedule(cfg, np.random.default_rng(round_seed(seed, server_round, client_id, 1)))
    trainer_rng = torch.Generator().manual_seed(round_seed(seed, server_round, client_id, 3))
    with torch.random.fork_rng(devices=[]):
        result = local_train(model, inputs, labels, cfg, schedule, defenses=tuple(defenses), generator=trainer_rng,
                             num_classes=data.num_classes)
    # In the model's order, never a set's: randomised defenses draw their noise key by key, and a set's order
    # changes with each process's string hash seed
    param_names = [name for name, _ in model.named_parameters() if name not in local_keys]
    update = {k: result.state[k] - global_state[k] for k in param_names}
    ctx = DefenseContext(generator=torch.Generator().manual_seed(round_seed(seed, server_round, client_id, 2)),
                         bn_stats=result.bn_stats, server_round=server_round, client_id=client_id)
    defended = apply_pipeline(defenses, update, ctx)
    state = {k: (global_state[k] + defended[k]) if k in defended else global_state[k] if k in local_keys else v
             for k, v in result.state.items() if k in global_state}  # local keys travel as they came
    shared = dict(ctx.shared)
    if threat.labels == "known":
        shared["labels"] = sorted(int(v) for v in labels.tolist())  # a multiset: the order would leak the sample order
    audit = AuditRecord(round=server_round, client_id=client_id, sample_ids=tuple(int(i) for i in sample_ids),
                        step_ids=tuple(int(sample_ids[p]) for step in schedule for p in step))
    return ClientReply(state=state, num_examples=len(sample_ids), train_loss=result.loss, shared=shared, audit=audit,
                       local_state={k: result.state[k].clone() for k in local_keys})


def observed_round(view: ServerView, model: nn.Module, global_state: dict[str, torch.Tensor], data: ImageData,
                   sample_ids: np.ndarray, cfg: TrainConfig, *, seed: int, server_round: int,
                   client_id: int) -> tuple[ObservedUpdate, ClientReply]:
    """A client's round (no defenses) and what the server observes of it, without the Flower records in between:
    the attacker's own surrogate clients and the experiments' hand-made clients (the federation and ``fedsim attack``
    go through the records and the auditor)."""
    reply = client_round(model, global_state, data, sample_ids, cfg, [], view.threat, seed=seed,
                         server_round=server_round, client_id=client_id)
    observed = view.observe(server_round, {k: v.numpy() for k, v in global_state.items()}, cfg.to_record(),
                            ReplyView(client_id, {k: v.numpy() for k, v in reply.state.items()}, reply.num_examples,
                                      reply.shared))
    return observed, reply


__all__ = ["ClientReply", "choose_samples", "client_round", "observed_round", "round_seed", "float_state"]
