"""Secure aggregation as a strategy wrapper: everything inside it sees only the round's aggregate.

Wrap it outermost (outside the honest-but-curious tee): ``aggregate_train`` replaces the round's successful replies
by one reply holding their example-weighted mean, computed exactly as Flower's FedAvg computes it (replies in
partition order), with the total number of examples. The inner FedAvg then averages a single reply (weight factor
1.0), so the global model is bit-identical to a run without the wrapper, and the tee can observe nothing but the
aggregate: one observed update per round with the union batch size. Failed replies pass through untouched (the
inner strategy records them). What the protocol would cryptographically guarantee is simulated by construction:
no per-client array leaves this wrapper.

The evaluator's side channel (each reply's audit record, never seen by the server) is merged into one audit: the
union of the clients' samples, which is what an attack on the aggregate is matched against.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SHARED, SIDE, merged_side

from .wrapper import Wrapper

AGGREGATE_ID = -1  # the "client id" of the round's aggregate in observed updates and leakage rows


class SecureAggregation(Wrapper):
    def __init__(self, inner: Strategy, partition_of: dict[int, int]) -> None:
        """``partition_of`` maps node id to partition id (the fixed order the sum is taken in)."""
        super().__init__(inner)
        self.partition_of = dict(partition_of)

    def aggregate_content(self, contents: list[RecordDict]) -> RecordDict:
        """One reply's records for the round: weighted mean arrays, total examples, merged audit, nothing shared."""
        arrays = aggregate_arrayrecords(contents, NUM_EXAMPLES)
        counts = [int(c[METRICS][NUM_EXAMPLES]) for c in contents]
        total = sum(counts)
        loss = sum(float(c[METRICS]["train-loss"]) * n for c, n in zip(contents, counts)) / total
        return RecordDict({ARRAYS: arrays, SHARED: ConfigRecord(),
                           METRICS: MetricRecord({NUM_EXAMPLES: total, "train-loss": loss}),
                           SIDE: merged_side(contents, AGGREGATE_ID)})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = sorted((m for m in replies if not m.has_error()),
                    key=lambda m: (self.partition_of.get(m.metadata.src_node_id, 1 << 30), m.metadata.src_node_id))
        failed = [m for m in replies if m.has_error()]
        if not ok:
            return self.inner.aggregate_train(server_round, failed)
        aggregate = ok[0]  # its envelope (metadata) carries the aggregate; the other replies are dropped
        aggregate.content = self.aggregate_content([m.content for m in ok])
        return self.inner.aggregate_train(server_round, [aggregate, *failed])
