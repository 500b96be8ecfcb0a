"""Single-update mode (``fedsim attack``): one client update per batch of chosen images, no federation.

The update is produced by the same client code as in a federation, seen through the same server view, attacked
by the same attacks and scored by the same evaluator; independent images are inverted in one batched computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from attacker.attacks import Attack, label_candidates
from attacker.evaluator import LeakageEvaluator
from attacker.records import LeakageRecord, ModelSpec, ObservedUpdate, ThreatModel

from .client import client_round, observed_delta
from .data import ImageData
from .defenses import Defense
from .models import build_model
from .results import RunDirectory
from .training import TrainConfig, float_state


def parse_indices(text: str) -> list[int]:
    """``0-9``, ``3,5,8`` or ``0-4,10-14``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += list(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"no indices in {text!r}")
    return out


@dataclass
class SingleUpdateJob:
    data: ImageData
    model_name: str
    indices: list[int]
    batch_size: int
    attack: Attack
    train: TrainConfig
    defenses: list[Defense] = field(default_factory=list)
    threat: ThreatModel = field(default_factory=ThreatModel)
    width: int = 64
    checkpoint: str | None = None
    seed: int = 0
    device: str = "cpu"


def run_single(job: SingleUpdateJob, output: Path) -> list[LeakageRecord]:
    data = job.data
    bad = [i for i in job.indices if not 0 <= i < len(data)]
    if bad:
        raise ValueError(f"--indices out of range for {data.name} ({len(data)} images): {bad[:5]}")
    if data.labels is None:
        raise ValueError(f"{data.name} has no labels; the victims are classifiers")
    model = build_model(job.model_name, data.num_classes, image_size=data.shape[1], width=job.width,
                        seed=job.seed, checkpoint=job.checkpoint)
    spec = ModelSpec(job.model_name, data.num_classes, data.shape, job.width)
    global_state = float_state(model)
    global_np = {k: v.numpy() for k, v in global_state.items()}
    store = RunDirectory(output)
    evaluator = LeakageEvaluator(lambda ids: (data.unit_tensor(ids), data.labels[ids]), store.leakage.append,
                                 grid_dir=store.root / "grids")

    observed_list = []
    batches = [job.indices[i:i + job.batch_size] for i in range(0, len(job.indices), job.batch_size)]
    for b, ids in enumerate(batches):
        fedsgd = job.train.mode == "fedsgd"
        cfg = replace(job.train, num_samples=len(ids), batch_size=len(ids) if fedsgd else job.train.batch_size)
        reply = client_round(model, global_state, data, np.asarray(ids), cfg, job.defenses, job.threat,
                             seed=job.seed, server_round=0, client_id=b)
        evaluator.register_audit(reply.audit)
        observed_list.append(ObservedUpdate(
            round=0, client_id=b, model=spec, normalization=(data.mean, data.std), global_state=global_np,
            update=observed_delta(global_np, {k: v.numpy() for k, v in reply.state.items()}),
            train_config=cfg.to_record(), num_examples=reply.num_examples, shared=reply.shared,
            defenses=tuple(d.tag() for d in job.defenses)))
    reconstructions = job.attack.reconstruct_many(observed_list, job.threat, device=job.device, seed=job.seed)
    for obs, rec in zip(observed_list, reconstructions):
        rec.extra.setdefault("label_candidates", label_candidates(obs, job.threat))
    return [evaluator.record(obs, job.attack.name, rec) for obs, rec in zip(observed_list, reconstructions)]
