"""The ClientApp: local training on this node's partition."""

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

from fedsim import mods
from fedsim.audit import audit_mod
from flowerapp.task import Net, load_data, test, train as train_fn

app = ClientApp()


@lru_cache(maxsize=8)
def _privacy(privacy: str, clipping_norm: float, epsilon: float, fraction: float):
    """The client half of the run config's privacy option (None: nothing on this side)."""
    choices = {
        "none": lambda: None,
        "server-fixed-clipping": lambda: None,  # all on the server
        "client-fixed-clipping": lambda: fixedclipping_mod,  # with DifferentialPrivacyClientSideFixedClipping
        "local-dp": lambda: LocalDpMod(clipping_norm, clipping_norm, epsilon, 1e-5),
        "topk": lambda: mods.topk(fraction=fraction),
    }
    if privacy not in choices:
        raise ValueError(f"run config privacy={privacy!r}; use one of {sorted(choices)}")
    return choices[privacy]()


def privacy_mod(msg: Message, context: Context, call_next) -> Message:
    rc = context.run_config
    mod = _privacy(str(rc["privacy"]), float(rc["clipping-norm"]), float(rc["local-dp-epsilon"]),
                   float(rc["topk-fraction"]))
    return call_next(msg, context) if mod is None else mod(msg, context, call_next)


@app.train(mods=[audit_mod, privacy_mod])  # audit_mod first: the audit sees what leaves the client
def train(msg: Message, context: Context) -> Message:
    rc, nc = context.run_config, context.node_config
    partition_id, num_partitions = int(nc["partition-id"]), int(nc["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    torch.set_num_threads(1)
    torch.manual_seed(int(rc["seed"]) * 100_003 + server_round * 1_009 + partition_id)

    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    images, labels = load_data(partition_id, num_partitions, str(rc["data-dir"]), int(rc["max-train-examples"]))
    loss = train_fn(net, images, labels, epochs=int(rc["local-epochs"]), batch_size=int(rc["batch-size"]),
                    lr=float(msg.content["config"]["lr"]), seed=server_round * 7919 + partition_id)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(images)})
    return Message(RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rc, nc = context.run_config, context.node_config
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    images, labels = load_data(int(nc["partition-id"]), int(nc["num-partitions"]), str(rc["data-dir"]))
    loss, accuracy = test(net, images, labels)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(images)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
