"""Observed updates kept across rounds (GIML's task buffer, a client's history for cross-round inversion), packed
into tensors and plain values so an attack's ``state_dict`` loads with ``weights_only=True``. The observed update is
written by the same function as the run directory's backlog (fedsim.backlog), so nothing of it is dropped here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.backlog import observed_from_record, observed_to_record
from fedsim.contract import ObservedUpdate
from fedsim.training import TrainConfig


@dataclass
class Kept:
    """One observed update with the labels the attack used for it and the client computation it simulates."""

    observed: ObservedUpdate
    labels: np.ndarray
    config: TrainConfig


def pack(item: Kept) -> dict:
    return {"observed": observed_to_record(item.observed), "labels": torch.from_numpy(np.asarray(item.labels)),
            "config": item.config.to_record()}


def unpack(d: dict) -> Kept:
    if "observed" not in d:
        raise ValueError("attacker state saved by an earlier fedsim (its kept updates lack their shared extras); "
                         "rerun the attack from round 1 or delete the run's attacker/ folder")
    return Kept(observed_from_record(d["observed"]), d["labels"].numpy(), TrainConfig.from_record(d["config"]))
