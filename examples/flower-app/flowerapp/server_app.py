"""The ServerApp: FedAvg with a decaying client learning rate, audited by fedsim when the run config says so."""

import hashlib
import json
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy)

from fedsim.audit import audited
from flowerapp.task import Net, load_test_data, test

app = ServerApp()


class DecayingLrFedAvg(FedAvg):
    """FedAvg that sends ``lr * lr_decay^(round - 1)`` to the clients and, optionally, appends a summary of every
    reply it aggregates to a JSON-lines report."""

    def __init__(self, *, lr_decay: float, report: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.lr_decay, self.report = lr_decay, report

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config = ConfigRecord({**config, "lr": float(config["lr"]) * self.lr_decay ** (server_round - 1)})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if self.report:
            with open(self.report, "a") as out:
                for msg in replies:
                    if not msg.has_error():
                        out.write(json.dumps({"round": server_round, **summary(msg)}) + "\n")
        return super().aggregate_train(server_round, replies)


def summary(msg: Message) -> dict:
    """Which records a reply holds and a digest of their values."""
    digest = hashlib.sha256()
    for key, record in msg.content.items():
        digest.update(key.encode())
        for name, value in record.items():
            digest.update(name.encode())
            digest.update(value.numpy().tobytes() if hasattr(value, "numpy") else repr(value).encode())
    return {"records": sorted(msg.content.keys()), "sha256": digest.hexdigest()}


def with_privacy(strategy: Strategy, rc) -> Strategy:
    """The server half of the run config's privacy option: Flower's central DP wrappers."""
    wrappers = {"server-fixed-clipping": DifferentialPrivacyServerSideFixedClipping,
                "client-fixed-clipping": DifferentialPrivacyClientSideFixedClipping}
    wrapper = wrappers.get(str(rc["privacy"]))
    if wrapper is None:
        return strategy
    return wrapper(strategy, noise_multiplier=float(rc["noise-multiplier"]), clipping_norm=float(rc["clipping-norm"]),
                   num_sampled_clients=int(rc["num-sampled-clients"]))


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    test_images, test_labels = load_test_data(str(rc["data-dir"]))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = Net()
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(net, test_images, test_labels)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy = DecayingLrFedAvg(lr_decay=float(rc["lr-decay"]), report=str(rc["client-report"]),
                                fraction_train=float(rc["fraction-train"]),
                                fraction_evaluate=float(rc["fraction-evaluate"]))
    strategy = with_privacy(strategy, rc)
    strategy = audited(strategy, context)  # fedsim: the curious server's audit (run config fedsim-audit)
    torch.manual_seed(int(rc["seed"]))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": float(rc["lr"])}),
                            num_rounds=int(rc["num-server-rounds"]), evaluate_fn=central_evaluate)
    if rc["final-model"]:
        torch.save(result.arrays.to_torch_state_dict(), str(rc["final-model"]))
