"""The honest-but-curious server: aggregates exactly like its inner strategy and shows each round's exchanges to the
attacker side.

Wrap it outermost (server-side wrappers such as DP clipping modify replies before the inner strategy sees them, while
a curious server sees them raw). It keeps the records it sent each node in ``configure_train`` (``aggregate_train``
is not given them) and, before the inner strategy aggregates, passes every successful reply with what was sent to
that node to ``observe(round, exchanges)`` (a :meth:`fedsim.audit.Auditor.observe`), which decides what the server
learns from them. The inner strategy then receives the replies as they would be without the audit: the evaluator's
side channel (``fedsim.audit``, see :mod:`fedsim.protocol`) removed, every other record the very object that arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.protocol import SIDE, Exchange, without_side

from .wrapper import Wrapper

log = logging.getLogger("fedsim")
Observe = Callable[[int, Sequence[Exchange]], object]


class HonestButCurious(Wrapper):
    """Delegates every hook to ``inner`` and, before aggregating, shows the round's exchanges to ``observe``."""

    def __init__(self, inner: Strategy, observe: Observe) -> None:
        super().__init__(inner)
        self.observe = observe
        self._sent: dict[int, dict[int, RecordDict]] = {}  # round -> node id -> the content sent to it

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = {server_round: {m.metadata.dst_node_id: m.content for m in messages}}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.get(server_round, {})
        exchanges = []
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            if node not in sent:  # not a reply to this round's train message: nothing to pair it with
                log.warning("round %d: a reply from node %d that was not sent a train message; not observed",
                            server_round, node)
                continue
            exchanges.append(Exchange(sent[node], msg.content))
        self.observe(server_round, exchanges)
        for msg in replies:
            if not msg.has_error() and SIDE in msg.content:
                msg.content = without_side(msg.content)
        return self.inner.aggregate_train(server_round, replies)
