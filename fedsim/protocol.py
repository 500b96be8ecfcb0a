"""What travels in a train exchange, in Flower records, and how the server reads it.

A train message holds ``arrays`` (ArrayRecord: the global model) and ``config`` (ConfigRecord: the train config).
A reply holds, under record keys the audit may rename (:class:`RecordKeys`, as Flower's FedAvg takes
``arrayrecord_key`` and ``weighted_by_key``):

- ``arrays`` (ArrayRecord): the client's new weights after its defenses;
- ``metrics`` (MetricRecord): ``num-examples`` (the FedAvg weight) and whatever else the client reports;
- ``shared`` (ConfigRecord, fedsim's clients): extras the client shares, e.g. ``labels`` or
  ``bn.<layer>.mean``/``bn.<layer>.var`` (the threat model decides which of them the server may use);
- ``fedsim.audit`` (ConfigRecord, :data:`SIDE`): the evaluator's side channel, never the server's: the client's
  ``partition-id``, and its ground truth, either ``sample-ids`` / ``step-ids`` (fedsim's clients) or the recorded
  batches (``batches``, bytes; a user's Flower app through :func:`fedsim.audit.record_batch`). The
  honest-but-curious wrapper removes it before any strategy sees the reply.

fedsim's ClientApp writes replies with :func:`reply_content`; the server reads them with :func:`read_reply` and
:func:`read_side`, and so does the single-update path, so both see the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .contract import AuditRecord, ReplyView

ARRAYS, METRICS, SHARED, CONFIG = "arrays", "metrics", "shared", "config"
SIDE = "fedsim.audit"  # the evaluator's side channel in a reply
NUM_EXAMPLES = "num-examples"


@dataclass(frozen=True)
class RecordKeys:
    """Where a strategy's messages keep what the audit reads (Flower's FedAvg defaults)."""

    arrays: str = ARRAYS  # the model, in the train message and in the reply
    config: str = CONFIG  # the train config the server sent
    metrics: str = METRICS  # the reply's MetricRecord
    num_examples: str = NUM_EXAMPLES  # the weight in it


class ReplyError(ValueError):
    """A reply the audit cannot read (the federation goes on; the reply is not audited)."""


@dataclass(frozen=True)
class Exchange:
    """One client's train exchange as the server saw it: the records it sent and the records that came back (the
    side channel included: the auditor splits it off)."""

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


# -- the side channel ----------------------------------------------------------------------------------------


def side_record(partition_id: int, audit: AuditRecord | None = None) -> ConfigRecord:
    """A fedsim client's side channel: its partition id and the ids of the samples it trained on."""
    record = ConfigRecord({"partition-id": int(partition_id)})
    if audit is not None:
        record["sample-ids"] = [int(i) for i in audit.sample_ids]
        record["step-ids"] = [int(i) for i in audit.step_ids]
    return record


def encode_batches(images: np.ndarray, labels: np.ndarray, steps: np.ndarray) -> bytes:
    """Recorded training batches: the distinct samples (model inputs) and, per position trained on, which one.
    Uncompressed: float inputs hardly compress, and the client's time is the audit's overhead."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, steps=steps)
    return buffer.getvalue()


def decode_batches(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return data["images"], data["labels"], data["steps"]


def client_id_of(content: RecordDict) -> int:
    """The partition id a reply's side channel names (a ReplyError if it has none)."""
    side = content.get(SIDE)
    if side is None or "partition-id" not in side:
        raise ReplyError(f"the reply has no {SIDE!r} record: add fedsim.audit.audit_mod to the ClientApp's mods")
    return int(side["partition-id"])


def read_side(content: RecordDict, server_round: int,
              normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> AuditRecord:
    """The evaluator's ground truth from a reply's side channel; recorded model inputs are mapped back to [0, 1]
    with the declared ``normalization``. No ids and no batches: an empty record (nothing was recorded)."""
    side = content[SIDE]
    client = client_id_of(content)
    if "batches" in side:
        images, labels, steps = decode_batches(side["batches"])
        if normalization is not None:
            mean, std = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in normalization)
            images = images * std + mean
        return AuditRecord(round=server_round, client_id=client, sample_ids=tuple(range(len(images))),
                           step_ids=tuple(int(i) for i in steps), images=np.clip(images, 0, 1).astype(np.float32),
                           labels=labels.astype(np.int64))
    return AuditRecord(round=server_round, client_id=client,
                       sample_ids=tuple(int(i) for i in side.get("sample-ids", [])),
                       step_ids=tuple(int(i) for i in side.get("step-ids", [])))


def merged_side(contents: list[RecordDict], client_id: int) -> ConfigRecord:
    """One side channel for several replies (secure aggregation's one reply a round): the union of their samples,
    under ``client_id``."""
    sides = [c[SIDE] for c in contents if SIDE in c]
    record = ConfigRecord({"partition-id": int(client_id)})
    if sides and all("batches" in s for s in sides):
        parts = [decode_batches(s["batches"]) for s in sides]
        offsets = np.cumsum([0] + [len(images) for images, _, _ in parts[:-1]])
        record["batches"] = encode_batches(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                           np.concatenate([p[2] + o for p, o in zip(parts, offsets)]))
    elif sides and all("sample-ids" in s for s in sides):
        record["sample-ids"] = [int(i) for s in sides for i in s["sample-ids"]]
        record["step-ids"] = [int(i) for s in sides for i in s["step-ids"]]
    return record


def without_side(content: RecordDict) -> RecordDict:
    """The reply as the server's strategy may see it: every record but the side channel, in order."""
    return RecordDict({key: record for key, record in content.items() if key != SIDE})


# -- replies -------------------------------------------------------------------------------------------------


def reply_content(reply, partition_id: int, keys) -> RecordDict:
    """The records of a fedsim client's train reply (``reply``: a fedsim.client.ClientReply) for the arrays
    ``keys``."""
    return RecordDict({
        ARRAYS: ArrayRecord({k: reply.state[k].contiguous() for k in keys}),
        METRICS: MetricRecord({NUM_EXAMPLES: reply.num_examples, "train-loss": reply.train_loss}),
        SHARED: encode_shared(reply.shared),
        SIDE: side_record(partition_id, reply.audit),
    })


def read_reply(content: RecordDict, keys: RecordKeys = RecordKeys()) -> ReplyView:
    """What the server reads of a reply: client id, weights, reported examples and every shared extra."""
    if keys.arrays not in content.array_records:
        raise ReplyError(f"the reply has no ArrayRecord {keys.arrays!r} (it has {sorted(content.array_records)}): "
                         f"set keys.arrays in the audit file")
    metrics = content.metric_records.get(keys.metrics)
    if metrics is None or keys.num_examples not in metrics:
        raise ReplyError(f"the reply has no {keys.metrics}[{keys.num_examples!r}]: set keys.metrics / "
                         f"keys.num_examples in the audit file")
    return ReplyView(client_id=client_id_of(content), arrays=arrays_to_numpy(content[keys.arrays]),
                     num_examples=int(metrics[keys.num_examples]), shared=decode_shared(content.get(SHARED)))
