"""The honest-but-curious server: aggregates exactly like its inner strategy and tees what it observes.

Wrap it outermost (server-side wrappers such as DP clipping modify replies before the inner strategy sees them, while
a curious server sees them raw). The tee turns each reply into an :class:`~fedsim.contract.ObservedUpdate` holding
only what the server legitimately has (built by :meth:`fedsim.contract.ServerView.observe`, the same function the
single-update path uses): the weights it sent, the reply's weights, the train config it sent, the reported metrics,
and the extras the threat model says clients share. The audit record in the reply goes to the
evaluator callback and never into an ``ObservedUpdate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.contract import AuditRecord, ObservedUpdate, ServerView
from fedsim.protocol import arrays_to_numpy, read_audit, read_reply

from .wrapper import Wrapper


class UpdateTee:
    """Converts the replies of one round into observed updates (for the attacker) and audits (for the evaluator)."""

    def __init__(self, view: ServerView, attacked_per_round: int, seed: int,
                 submit: Callable[[list[ObservedUpdate]], None],
                 audit: Callable[[AuditRecord], None], rounds: list[int] | None = None) -> None:
        self.view = view
        self.attacked_per_round = attacked_per_round
        self.rounds = None if rounds is None else set(rounds)  # attacked rounds (None: all)
        self.seed = seed
        self.submit, self.audit = submit, audit

    def observe(self, server_round: int, sent: ArrayRecord, config: ConfigRecord, replies: list[Message]) -> None:
        if self.rounds is not None and server_round not in self.rounds:
            return
        contents = [msg.content for msg in replies if not msg.has_error()]
        self.observe_contents(server_round, arrays_to_numpy(sent), dict(config.items()), contents)

    def observe_contents(self, server_round: int, global_np: dict, train_config: dict,
                         contents: list[RecordDict]) -> None:
        """The round's successful reply contents (Flower records) -> observed updates and audits."""
        observed = [self.view.observe(server_round, global_np, train_config, read_reply(c)) for c in contents]
        audits = [read_audit(c, server_round) for c in contents]
        if not observed or self.attacked_per_round == 0:
            return
        # Under secure aggregation (strategies.secure_aggregation, wrapped outside this tee) the one reply here is
        # the round's aggregate: it is observed and attacked like any other.
        for a in audits:
            self.audit(a)
        rng = np.random.default_rng([self.seed, server_round, 11])
        ids = sorted(o.client_id for o in observed)
        chosen = set(rng.choice(ids, size=min(self.attacked_per_round, len(ids)), replace=False).tolist())
        self.submit([o for o in sorted(observed, key=lambda o: o.client_id) if o.client_id in chosen])


class HonestButCurious(Wrapper):
    """Delegates every hook to ``inner`` and, before aggregating, shows the round's replies to ``tee``."""

    def __init__(self, inner: Strategy, tee: UpdateTee) -> None:
        super().__init__(inner)
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
