"""One base class for strategy wrappers: every hook passes through to ``inner``; subclasses override what they
change (Flower's style of small wrappers around a strategy)."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy


class Wrapper(Strategy):
    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
