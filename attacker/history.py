"""Observed updates kept across rounds (GIML's task buffer, a client's history for cross-round inversion), packed
into tensors and plain values so an attack's ``state_dict`` loads with ``weights_only=True``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.contract import ModelSpec, ObservedUpdate
from fedsim.training import TrainConfig


@dataclass
class Kept:
    """One observed update with the labels the attack used for it and the client computation it simulates."""

    observed: ObservedUpdate
    labels: np.ndarray
    config: TrainConfig


def pack(item: Kept) -> dict:
    obs = item.observed
    m = obs.model
    return {"round": obs.round, "client": obs.client_id, "num_examples": obs.num_examples,
            "model": [m.name, m.num_classes, *m.image_shape, m.width, m.activation],
            "normalization": [list(v) for v in obs.normalization],
            "global_state": {k: torch.from_numpy(np.array(v)) for k, v in obs.global_state.items()},
            "update": {k: torch.from_numpy(np.array(v)) for k, v in obs.update.items()},
            "train_config": dict(obs.train_config), "defenses": list(obs.defenses),
            "labels": torch.from_numpy(np.asarray(item.labels)), "config": item.config.to_record()}


def unpack(d: dict) -> Kept:
    name, classes, c, h, w, width, activation = d["model"]
    spec = ModelSpec(name, int(classes), (int(c), int(h), int(w)), int(width), activation)
    obs = ObservedUpdate(round=int(d["round"]), client_id=int(d["client"]), model=spec,
                         normalization=tuple(tuple(float(x) for x in v) for v in d["normalization"]),
                         global_state={k: v.numpy() for k, v in d["global_state"].items()},
                         update={k: v.numpy() for k, v in d["update"].items()},
                         train_config=dict(d["train_config"]), num_examples=int(d["num_examples"]),
                         defenses=tuple(d["defenses"]))
    return Kept(obs, d["labels"].numpy(), TrainConfig.from_record(d["config"]))
