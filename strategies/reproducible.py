"""Reproducible client sampling and aggregation order around any Message-API strategy.

Flower samples nodes with the global ``random`` module over node ids that are random per run, and aggregates in
reply-arrival order (floating-point sums depend on order). This wrapper samples by stable partition id with a
generator seeded per (seed, round), hands the inner strategy exactly those nodes, and passes replies to it sorted
by partition id. Aggregation itself is the inner strategy's, untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class ClientFailure(RuntimeError):
    """A sampled client replied with an error."""


def reason_of(msg: Message) -> str:
    """The last line of a failed reply's reason (Flower puts the client's traceback there)."""
    lines = [line.strip() for line in str(msg.error.reason).splitlines() if line.strip()]
    return lines[-1] if lines else f"error code {msg.error.code}"


class _SampledGrid:
    """A view of the grid that exposes only the nodes sampled for this round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name):
        return getattr(self._grid, name)


class ReproducibleSampling(Strategy):
    def __init__(self, inner: Strategy, partition_of: dict[int, int], clients_per_round: int, seed: int,
                 fail_on_client_error: bool = True,
                 on_failure: Callable[[int, int, str], None] | None = None, poisson: bool = False) -> None:
        """``inner`` must train on every node it is shown (e.g. ``FedAvg(fraction_train=1.0, min_train_nodes=1,
        min_available_nodes=1)``); ``partition_of`` maps node id to partition id. A client that replies with an
        error either stops the run (``fail_on_client_error``) or is reported to ``on_failure(round, client,
        reason)`` and left out of the round's aggregate. ``poisson``: each client is sampled independently with
        probability clients_per_round / number of clients (a round may sample none: the model then stays)."""
        self.inner = inner
        self.partition_of = dict(partition_of)
        self.node_of = {pid: nid for nid, pid in self.partition_of.items()}
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.fail_on_client_error = fail_on_client_error
        self.on_failure = on_failure
        self.poisson = poisson

    def sample(self, server_round: int) -> list[int]:
        """Partition ids sampled in ``server_round`` (sorted)."""
        rng = np.random.default_rng([self.seed, server_round, 7])
        pids = sorted(self.node_of)
        if self.poisson:
            chosen = rng.random(len(pids)) < self.clients_per_round / len(pids)
            return [int(p) for p, c in zip(pids, chosen) if c]
        return sorted(int(p) for p in rng.choice(pids, size=self.clients_per_round, replace=False))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = [self.node_of[p] for p in self.sample(server_round)]
        if not nodes:  # Poisson sampling drew nobody: no messages (the inner strategy would wait for nodes)
            return []
        return self.inner.configure_train(server_round, arrays, config, _SampledGrid(grid, nodes))

    def order(self, replies: Iterable[Message]) -> list[Message]:
        def key(msg: Message) -> tuple[int, int]:
            return (self.partition_of.get(msg.metadata.src_node_id, 1 << 30), msg.metadata.src_node_id)

        return sorted(replies, key=key)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.order(replies)
        if not replies:  # nobody was sampled: the global model stays as it is
            return None, None
        failed = [m for m in replies if m.has_error()]
        if failed and self.fail_on_client_error:
            first = failed[0]
            pid = self.partition_of.get(first.metadata.src_node_id, "?")
            raise ClientFailure(f"client {pid} failed in round {server_round}: {reason_of(first)} "
                                f"({len(failed)} of {len(replies)} clients failed)")
        for msg in failed:
            if self.on_failure:
                self.on_failure(server_round, self.partition_of.get(msg.metadata.src_node_id, -1), reason_of(msg))
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            raise ClientFailure(f"every client failed in round {server_round}; client "
                                f"{self.partition_of.get(failed[0].metadata.src_node_id, '?')}: {reason_of(failed[0])}")
        return self.inner.aggregate_train(server_round, ok)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, self.order(replies))

    def summary(self) -> None:
        self.inner.summary()
