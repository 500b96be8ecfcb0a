"""Single-update mode (``fedsim attack``): one client update per batch of chosen images, no federation.

The update is produced by the same client code as in a federation and goes through the same auditor (server view,
attacker, evaluator, run directory); independent images are inverted in one batched computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from .audit import AuditPlan, Auditor, PoolSettings
from .client import client_round
from .contract import Attack, LeakageRecord, ModelSpec, ServerView, ThreatModel
from .data import ImageData
from .defenses import Defense
from .models import build_model
from .protocol import ARRAYS, CONFIG, Exchange, reply_content
from .results import RunDirectory
from .seeds import attacker_root
from .training import TrainConfig, float_state


def parse_indices(text: str) -> list[int]:
    """``0-9``, ``3,5,8`` or ``0-4,10-14``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out += list(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--indices {text!r}: expected ranges and numbers such as 0-9 or 1,4,7") from None
    if not out:
        raise ValueError(f"no indices in {text!r}")
    repeated = sorted({i for i in out if out.count(i) > 1})
    if repeated:  # an image is one client's sample once: a repeat would give two updates one identity
        raise ValueError(f"--indices {text!r}: {repeated[:5]} given more than once")
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
    activation: str = "default"


def run_single(job: SingleUpdateJob, output: Path, *, overwrite: bool = False) -> list[LeakageRecord]:
    """Attack the job's updates and write their rows to ``output`` (a directory that already holds results is
    refused unless ``overwrite``)."""
    data = job.data
    bad = [i for i in job.indices if not 0 <= i < len(data)]
    if bad:
        raise ValueError(f"--indices out of range for {data.name} ({len(data)} images): {bad[:5]}")
    if data.labels is None:
        raise ValueError(f"{data.name} has no labels; the victims are classifiers")
    model = build_model(job.model_name, data.num_classes, image_size=data.shape[1], width=job.width,
                        seed=job.seed, checkpoint=job.checkpoint, activation=job.activation,
                        checkpoint_key="--trained")
    spec = ModelSpec(job.model_name, data.num_classes, data.shape, job.width, job.activation)
    job.attack.check(spec)
    job.attack.check_threat(job.threat)
    global_state = float_state(model)
    attack_spec = {"name": job.attack.name, **job.attack.model_dump()}
    store = RunDirectory(output, "overwrite" if overwrite else "new")
    try:
        return _attack(job, spec, model, global_state, attack_spec, store)
    finally:
        store.close()


def _attack(job: SingleUpdateJob, spec: ModelSpec, model, global_state: dict, attack_spec: dict,
            store: RunDirectory) -> list[LeakageRecord]:
    data = job.data
    store.write_config({
        "name": store.root.name, "command": "fedsim attack", "seed": job.seed, "device": job.device,
        "data": {"dataset": data.name, "indices": job.indices, "batch_size": job.batch_size},
        "model": {"name": job.model_name, "width": job.width, "activation": job.activation,
                  "checkpoint": job.checkpoint},
        "client": asdict(job.train), "defenses": [{"name": d.name, **d.model_dump()} for d in job.defenses],
        "threat": asdict(job.threat), "attacks": [attack_spec]})
    # The same auditor as a federation's: the replies go through the Flower records a client would send and the
    # server's view of them; the attack runs inline on all of them at once (one batched inversion).
    view = ServerView(spec, (data.mean, data.std), job.threat, tuple(d.tag() for d in job.defenses))
    pool = PoolSettings(executor="inline", workers=1, device=job.device, threads=torch.get_num_threads())  # --threads
    plan = AuditPlan(view, (attack_spec,), attacker_root(job.seed), pool=pool, learn=False, backlog=False)
    rows: list[LeakageRecord] = []
    sent_arrays = ArrayRecord(global_state)
    exchanges = []
    batches = [job.indices[i:i + job.batch_size] for i in range(0, len(job.indices), job.batch_size)]
    for ids in batches:
        # A batch's client is named by its first image, so an image's update (and the attack's draws for it, which
        # follow the update's identity) is the same whichever --indices it was attacked in.
        client = ids[0]
        fedsgd = job.train.mode == "fedsgd"
        cfg = replace(job.train, num_samples=len(ids), batch_size=len(ids) if fedsgd else job.train.batch_size)
        reply = client_round(model, global_state, data, np.asarray(ids), cfg, job.defenses, job.threat,
                             seed=job.seed, server_round=0, client_id=client)
        sent = RecordDict({ARRAYS: sent_arrays, CONFIG: ConfigRecord(cfg.to_record())})
        exchanges.append(Exchange(sent, reply_content(reply, client, global_state)))
    auditor = Auditor(plan, store, data.ground_truth, on_row=rows.append)
    auditor.observe(0, exchanges)
    auditor.close()
    position = {batch[0]: i for i, batch in enumerate(batches)}
    return sorted(rows, key=lambda row: position[row.client_id])  # in the order the images were given
