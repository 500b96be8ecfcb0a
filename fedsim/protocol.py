"""The reply contract between fedsim clients and the server, in Flower records.

A train reply holds: ``arrays`` (ArrayRecord: the client's new weights after defenses), ``metrics`` (MetricRecord:
``num-examples``, ``train-loss``, ``partition-id``), ``shared`` (ConfigRecord: extras the client shares, e.g.
``labels`` or ``bn.<layer>.mean``/``bn.<layer>.var``) and ``audit`` (ConfigRecord: ``sample-ids`` and ``step-ids``,
the ground truth for the evaluator only). Flower's FedAvg aggregates the one ArrayRecord and MetricRecord and ignores
ConfigRecords. The ClientApp writes replies with :func:`reply_content`; the server reads them with
:func:`read_reply` and :func:`read_audit`, and so does the single-update path, so both see the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .contract import AuditRecord, ReplyView

ARRAYS, METRICS, SHARED, AUDIT, CONFIG = "arrays", "metrics", "shared", "audit", "config"


@dataclass(frozen=True)
class Exchange:
    """One client's train exchange as the server saw it: the records it sent (``arrays``: the global model,
    ``config``: the train config) and the records that came back."""

    sent: RecordDict
    reply: RecordDict


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def encode_shared(shared: dict) -> ConfigRecord:
    record = ConfigRecord()
    if "labels" in shared:
        record["labels"] = [int(v) for v in shared["labels"]]
    for layer, (mean, var) in shared.get("bn_stats", {}).items():
        record[f"bn.{layer}.mean"] = [float(v) for v in mean.flatten().tolist()]
        record[f"bn.{layer}.var"] = [float(v) for v in var.flatten().tolist()]
    return record


def decode_shared(record: ConfigRecord | None) -> dict:
    if record is None:
        return {}
    shared: dict = {}
    if "labels" in record:
        shared["labels"] = list(record["labels"])
    bn: dict = {}
    for key, value in record.items():
        if key.startswith("bn.") and key.endswith(".mean"):
            layer = key[3:-5]
            bn[layer] = (np.asarray(value, dtype=np.float32), np.asarray(record[f"bn.{layer}.var"], dtype=np.float32))
    if bn:
        shared["bn_stats"] = bn
    return shared


def encode_audit(audit: AuditRecord) -> ConfigRecord:
    return ConfigRecord({"sample-ids": list(audit.sample_ids), "step-ids": list(audit.step_ids)})


def reply_content(reply, partition_id: int, keys) -> RecordDict:
    """The records of a client's train reply (``reply``: a fedsim.client.ClientReply) for the arrays ``keys``."""
    return RecordDict({
        ARRAYS: ArrayRecord({k: reply.state[k].contiguous() for k in keys}),
        METRICS: MetricRecord({"num-examples": reply.num_examples, "train-loss": reply.train_loss,
                               "partition-id": partition_id}),
        SHARED: encode_shared(reply.shared),
        AUDIT: encode_audit(reply.audit),
    })


def read_reply(content: RecordDict) -> ReplyView:
    """What the server reads of a reply: client id, weights, reported examples and every shared extra."""
    metrics = content[METRICS]
    return ReplyView(client_id=int(metrics["partition-id"]), arrays=arrays_to_numpy(content[ARRAYS]),
                     num_examples=int(metrics["num-examples"]), shared=decode_shared(content.get(SHARED)))


def read_audit(content: RecordDict, server_round: int) -> AuditRecord:
    record = content[AUDIT]
    return AuditRecord(round=server_round, client_id=int(content[METRICS]["partition-id"]),
                       sample_ids=tuple(int(i) for i in record["sample-ids"]),
                       step_ids=tuple(int(i) for i in record["step-ids"]))
