"""The reply contract between fedsim clients and the server, in Flower records.

A train reply holds: ``arrays`` (ArrayRecord: the client's new weights after defenses), ``metrics`` (MetricRecord:
``num-examples``, ``train-loss``, ``partition-id``), ``shared`` (ConfigRecord: extras the client shares, e.g.
``labels`` or ``bn.<layer>.mean``/``bn.<layer>.var``) and ``audit`` (ConfigRecord: ``sample-ids`` and ``step-ids``,
the ground truth for the evaluator only). Flower's FedAvg aggregates the one ArrayRecord and MetricRecord and ignores
ConfigRecords.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from attacker.records import AuditRecord

ARRAYS, METRICS, SHARED, AUDIT, CONFIG = "arrays", "metrics", "shared", "audit", "config"


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


def decode_audit(content: RecordDict, server_round: int, client_id: int) -> AuditRecord:
    record = content[AUDIT]
    return AuditRecord(round=server_round, client_id=client_id, sample_ids=tuple(int(i) for i in record["sample-ids"]),
                       step_ids=tuple(int(i) for i in record["step-ids"]))
