"""The honest-but-curious server: aggregates exactly like its inner strategy and tees what it observes.

Wrap it outermost (server-side wrappers such as DP clipping modify replies before the inner strategy sees them, while
a curious server sees them raw). The tee turns each reply into an :class:`~attacker.records.ObservedUpdate` holding
only what the server legitimately has: the weights it sent, the reply's weights, the train config it sent, the
reported metrics, and the extras the threat model says clients share. The audit record in the reply goes to the
evaluator callback and never into an ``ObservedUpdate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from attacker.records import AuditRecord, ModelSpec, ObservedUpdate, ThreatModel

from .protocol import ARRAYS, METRICS, SHARED, arrays_to_numpy, decode_audit, decode_shared


class UpdateTee:
    """Converts the replies of one round into observed updates (for the attacker) and audits (for the evaluator)."""

    def __init__(self, model: ModelSpec, normalization, threat: ThreatModel, defense_tags: tuple[str, ...],
                 attacked_per_round: int, seed: int,
                 submit: Callable[[list[ObservedUpdate]], None],
                 audit: Callable[[AuditRecord], None],
                 audit_sum: Callable[[int, list[AuditRecord]], None] | None = None) -> None:
        self.model, self.normalization, self.threat = model, normalization, threat
        self.defense_tags = defense_tags
        self.attacked_per_round = attacked_per_round
        self.seed = seed
        self.submit, self.audit, self.audit_sum = submit, audit, audit_sum

    def _visible_shared(self, shared: dict) -> dict:
        allowed = {}
        if self.threat.labels == "known" and "labels" in shared:
            allowed["labels"] = shared["labels"]
        if self.threat.bn_stats_shared and "bn_stats" in shared:
            allowed["bn_stats"] = shared["bn_stats"]
        return allowed

    def observe(self, server_round: int, sent: ArrayRecord, config: ConfigRecord, replies: list[Message]) -> None:
        global_np = arrays_to_numpy(sent)
        train_config = {k: v for k, v in config.items() if k != "server-round"}
        observed, audits = [], []
        for msg in replies:
            if msg.has_error():
                continue
            content = msg.content
            metrics = content[METRICS]
            client_id = int(metrics["partition-id"])
            reply_np = arrays_to_numpy(content[ARRAYS])
            update = {k: reply_np[k].astype(np.float32) - global_np[k].astype(np.float32) for k in global_np}
            audits.append(decode_audit(content, server_round, client_id))
            observed.append(ObservedUpdate(
                round=server_round, client_id=client_id, model=self.model, normalization=self.normalization,
                global_state=global_np, update=update, train_config=train_config,
                num_examples=int(metrics["num-examples"]),
                shared=self._visible_shared(decode_shared(content.get(SHARED))), defenses=self.defense_tags))
        if not observed or self.attacked_per_round == 0:
            return
        if self.threat.secure_aggregation:
            self._observe_sum(server_round, observed, audits)
            return
        for a in audits:
            self.audit(a)
        rng = np.random.default_rng([self.seed, server_round, 11])
        ids = sorted(o.client_id for o in observed)
        chosen = set(rng.choice(ids, size=min(self.attacked_per_round, len(ids)), replace=False).tolist())
        self.submit([o for o in sorted(observed, key=lambda o: o.client_id) if o.client_id in chosen])

    def _observe_sum(self, server_round: int, observed: list[ObservedUpdate], audits: list[AuditRecord]) -> None:
        """Secure aggregation: the server learns only the example-weighted sum (what FedAvg adds to the model)."""
        total = sum(o.num_examples for o in observed)
        update = {k: sum(o.update[k] * (o.num_examples / total) for o in observed) for k in observed[0].update}
        first = observed[0]
        if self.audit_sum:
            self.audit_sum(server_round, audits)
        self.submit([ObservedUpdate(round=server_round, client_id=-1, model=first.model,
                                    normalization=first.normalization, global_state=first.global_state,
                                    update=update, train_config=first.train_config, num_examples=total,
                                    shared={}, defenses=first.defenses)])


class HonestButCurious(Strategy):
    """Delegates every hook to ``inner`` and, before aggregating, shows the round's replies to ``tee``."""

    def __init__(self, inner: Strategy, tee: UpdateTee) -> None:
        self.inner = inner
        self.tee = tee
        self._sent: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # aggregate_train is not given the arrays that were sent: keep them (and the config) for the tee.
        self._sent = {server_round: (arrays, config)}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent, config = self._sent[server_round]
        self.tee.observe(server_round, sent, config, replies)
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
