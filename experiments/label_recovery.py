"""Label recovery from one client update, every method, batch 1..64: experiments/label_recovery.md (+ rows parquet).

Each trial draws a batch from a real image slice (CIFAR-10 training images: labels repeat as they do in real data;
ImageNet 64x64 samples: one image per class, so every batch has distinct labels out of 1000 classes), computes the
client's update with fedsim's own local training (FedSGD: one step on the batch; FedAvg: several epochs of
mini-batches, shuffled) and recovers the label multiset with each registered method from the update alone.

    python experiments/label_recovery.py            # ~25 min on 2 CPU cores
    python experiments/label_recovery.py --quick    # a smoke run (few trials)
    python experiments/label_recovery.py --tables   # only rewrite the tables in label_recovery.md from the parquet
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attacker.attacks import TRAJECTORY_POINTS
from attacker.labels import model_probe, recover_labels_named
from fedsim.data import load_dataset, read_npz
from fedsim.models import build_model
from fedsim.training import TrainConfig, float_state, local_train, step_schedule
from fedsim.victims import train_centrally

HERE = Path(__file__).parent
DATA = Path(os.environ.get("FEDSIM_DATA_DIR", HERE.parent.parent / "shared" / "data"))
METHODS = ("idlg", "yin", "llg", "count", "ilrg", "auto")


@dataclass(frozen=True)
class Victim:
    dataset: str  # cifar10 | imagenet
    model: str
    width: int
    trained: bool
    activation: str = "default"

    @property
    def label(self) -> str:
        w = f"-{self.width}" if self.model in ("convnet", "resnet18") else ""
        act = " (sigmoid)" if self.activation == "sigmoid" else ""
        return f"{self.model}{w}{act}, {'trained' if self.trained else 'untrained'}"


def load(dataset: str):
    if dataset == "cifar10":
        return load_dataset("cifar10", "train", path=DATA / "cifar10_train_0-3999.npz")
    return read_npz(DATA / "imagenet64_sample_even_classes.npz", name="imagenet")


_MODELS: dict = {}


def victim_model(v: Victim, data, log) -> torch.nn.Module:
    if v not in _MODELS:
        _MODELS[v] = _build_victim(v, data, log)
    return _MODELS[v]


def _build_victim(v: Victim, data, log) -> torch.nn.Module:
    if not v.trained:
        return build_model(v.model, data.num_classes, image_size=data.shape[1], width=v.width, seed=0,
                           activation=v.activation)
    # Briefly trained on the slice itself (CIFAR-10: 4000 training images; ImageNet: the 500 samples, so the
    # model has seen the images it is then attacked on: a confident, non-uniform model is what matters here).
    epochs = 5 if v.dataset == "cifar10" else 15
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "victim.pt"
        result = train_centrally(v.model, data, None, epochs=epochs, batch_size=64, lr=0.05, width=v.width, seed=0,
                                 output=checkpoint, log=lambda _m: None, activation=v.activation)
        log(f"  trained {v.label} on {v.dataset}: train accuracy {result['train_accuracy']:.2f}")
        return build_model(v.model, data.num_classes, image_size=data.shape[1], width=v.width, seed=0,
                           activation=v.activation, checkpoint=checkpoint)


def client_update(model, data, ids: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> dict:
    start = float_state(model)
    trained = local_train(copy.deepcopy(model), data.model_input(ids), data.label_tensor(ids), cfg,
                          step_schedule(cfg, rng))
    return {k: (trained.state[k] - start[k]).numpy() for k in start if k in trained.state}


def scores(pred: np.ndarray, true: np.ndarray, classes: int) -> dict:
    p, t = np.bincount(pred, minlength=classes), np.bincount(true, minlength=classes)
    present_p, present_t = p > 0, t > 0
    return {"exact": float((p == t).all()), "instance_acc": float(np.minimum(p, t).sum() / len(true)),
            "class_acc": float((present_p & present_t).sum() / (present_p | present_t).sum())}


def trials(victim: Victim, data, model, batch: int, count: int, cfg: TrainConfig | None, seed: int,
           trajectory: bool = True) -> list[dict]:
    rows = []
    rng = np.random.default_rng([seed, batch])
    for trial in range(count):
        ids = rng.choice(len(data), size=batch, replace=False)
        true = np.sort(data.labels[ids])
        run_cfg = cfg or TrainConfig(mode="fedsgd", lr=0.1, batch_size=batch, num_samples=batch)
        update = client_update(model, data, ids, run_cfg, rng)
        steps = len(step_schedule(run_cfg))
        points = min(steps, TRAJECTORY_POINTS) if trajectory else 1
        probe = functools.cache(model_probe(model, data.shape, update=update, points=points))

        for method in METHODS:
            if method == "idlg" and batch != 1:
                continue
            try:
                pred, name = recover_labels_named(update, data.num_classes, batch, method, lr=run_cfg.lr,
                                                  steps=steps, probe=probe)
            except ValueError:
                continue
            rows.append({"dataset": victim.dataset, "victim": victim.label, "trained": victim.trained,
                         "mode": run_cfg.mode, "epochs": run_cfg.epochs, "local_batch": run_cfg.batch_size,
                         "batch": batch, "trial": trial, "method": method, "ran": name,
                         "trajectory_points": points, **scores(pred, true, data.num_classes)})
    return rows


TABLES_START, TABLES_END = "<!-- tables:start -->", "<!-- tables:end -->"


def tables(frame: pd.DataFrame) -> str:
    """Markdown tables of the rows: instance accuracy (exact-count rate) per victim, batch and method."""

    def cell(group: pd.DataFrame) -> str:
        return f"{group['instance_acc'].mean():.2f} ({group['exact'].mean():.2f})"

    def block(rows: pd.DataFrame, index: list[str]) -> str:
        methods = [m for m in METHODS if m in set(rows["method"])]
        lines = ["| " + " | ".join(index + methods + ["auto ran"]) + " |",
                 "|" + "---|" * (len(index) + len(methods) + 1)]
        for key, group in rows.groupby(index, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            by = dict(list(group.groupby("method")))
            ran = ", ".join(sorted(set(group.loc[group["method"] == "auto", "ran"])))
            lines.append("| " + " | ".join([str(k) for k in key] + [cell(by[m]) if m in by else "-" for m in methods]
                                           + [ran]) + " |")
        return "\n".join(lines)

    sgd = frame[frame["mode"] == "fedsgd"]
    avg = frame[frame["mode"] == "fedavg"]
    parts = ["### FedSGD: one step on the whole batch", "",
             "Instance accuracy (fraction of exact exact-count rate in brackets), mean over the trials.", ""]
    for (dataset, victim), rows in sgd.groupby(["dataset", "victim"], sort=False):
        parts += [f"**{dataset}, {victim}**", "", block(rows, ["batch"]), ""]
    if len(avg):
        parts += ["### FedAvg: local epochs of shuffled mini-batches of 4 (convnet-16, CIFAR-10)", "",
                  "`trajectory_points` = 1: count / iLRG probe the model at the sent weights; > 1: averaged along the "
                  "interpolated local trajectory (sent -> returned weights).", "",
                  block(avg, ["victim", "epochs", "batch", "trajectory_points"]), ""]
    return "\n".join(parts).replace("exact exact-count", "exact-count")


def write_tables(frame: pd.DataFrame, path: Path = HERE / "label_recovery.md") -> None:
    text = path.read_text()
    head, rest = text.split(TABLES_START)
    _, tail = rest.split(TABLES_END)
    path.write_text(head + TABLES_START + "\n" + tables(frame) + TABLES_END + tail)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tables", action="store_true", help="only rewrite the .md tables from the parquet")
    args = parser.parse_args()
    if args.tables:
        write_tables(pd.read_parquet(HERE / "label_recovery.rows.parquet"))
        return
    torch.set_num_threads(2)
    count = 2 if args.quick else 6
    batches = (1, 8) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    victims = [Victim("cifar10", "lenet_zhu", 0, False), Victim("cifar10", "convnet", 16, False),
               Victim("cifar10", "convnet", 16, True), Victim("cifar10", "resnet18", 16, False),
               Victim("cifar10", "resnet18", 16, True), Victim("imagenet", "resnet18", 16, False),
               Victim("imagenet", "resnet18", 16, True)]
    rows: list[dict] = []
    t0 = time.time()
    datasets = {name: load(name) for name in ("cifar10", "imagenet")}
    for victim in victims:
        data = datasets[victim.dataset]
        model = victim_model(victim, data, print)
        for batch in batches:
            rows += trials(victim, data, model, batch, count, None, seed=0)
        print(f"{victim.label} {victim.dataset}: done at {time.time() - t0:.0f} s", flush=True)
    # FedAvg: several local steps; count with the model probed along the local trajectory vs at the sent weights.
    data = datasets["cifar10"]
    for trained in (False, True):
        victim = Victim("cifar10", "convnet", 16, trained)
        model = victim_model(victim, data, print)
        for epochs in (1, 5):
            for size in (16, 64):
                cfg = TrainConfig(mode="fedavg", lr=0.1, epochs=epochs, batch_size=4, num_samples=size, shuffle=True)
                for trajectory in (True, False):
                    rows += trials(victim, data, model, size, count, cfg, seed=1, trajectory=trajectory)
    frame = pd.DataFrame(rows)
    if not args.quick:
        frame.to_parquet(HERE / "label_recovery.rows.parquet")
        write_tables(frame)
    print(f"{len(frame)} rows in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
