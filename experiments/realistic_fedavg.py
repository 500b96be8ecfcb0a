"""How much do realistic FedAvg recipes leak? experiments/realistic_fedavg.md (+ rows parquet).

CIFAR-10, LeNet (Zhu) untrained and briefly trained (1 epoch on the public slice). One client per setting trains
local epochs {1, 2, 5} x local batch {4, 16} x images {16, 64} (CIFAR-10 test images; plain SGD, lr 0.1, reshuffled
every epoch: the server knows lr, epochs and batch size, not the order). The server attacks the update with
replay-IG (Inverting Gradients replaying the local steps on one copy, in the sent order), ``fedavg_leakage``
(Dimitrov et al. 2022), and both tuned on surrogate updates of the attacker's own public images (the CIFAR-10
training slice; never the client's). Labels are recovered (``auto``: count with the trajectory probe). Per image,
PSNR after best matching; an image is *recovered* at PSNR >= 20 dB. Plus the closest CPU analogue of Dimitrov et
al.'s headline (10 local epochs of batches of 5 images, FEMNIST): 10 epochs x 4 batches of 4.

    python experiments/realistic_fedavg.py --victim untrained --headline &   # ~50 min on one core
    python experiments/realistic_fedavg.py --victim trained &                # ~40 min on one core
    python experiments/realistic_fedavg.py --tables               # merge the parts, write the .md tables
    python experiments/realistic_fedavg.py --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedsim.client import observed_round
from fedsim.contract import ModelSpec, ServerView, ThreatModel, build_attack
from fedsim.data import load_dataset
from fedsim.metrics import score
from fedsim.models import build_model
from fedsim.training import TrainConfig, float_state
from fedsim.victims import train_centrally

HERE = Path(__file__).parent
DATA = Path(os.environ.get("FEDSIM_DATA_DIR", HERE.parent.parent / "shared" / "data"))
ROWS = HERE / "realistic_fedavg.rows.parquet"
THRESHOLD = 20.0  # dB: an image counts as recovered at or above it (after best matching)
PARTIAL = 15.0  # dB: reported beside it (coarse layout and colours recognisable, details not)
ITERATIONS = 200
HEADLINE_ITERATIONS = 600
TUNE = {"trials": 3, "surrogates": 1}  # each trial at the attack's own budget (settings tuned at a shorter one did not transfer)
METHODS = {
    "replay-IG": {"name": "inverting_gradients"},
    "fedavg_leakage": {"name": "fedavg_leakage"},
    "replay-IG tuned": {"name": "inverting_gradients", "tune": TUNE},
    "fedavg_leakage tuned": {"name": "fedavg_leakage", "tune": TUNE},
}
THREAT = ThreatModel(labels="recovered", label_method="auto", public_data=str(DATA / "cifar10_train_0-3999.npz"))


def victim(trained: bool) -> dict[str, torch.Tensor]:
    """The public model the server sends: LeNet (Zhu), seed 0, or after 1 epoch on the public training slice."""
    public = load_dataset(THREAT.public_data)
    if not trained:
        return float_state(build_model("lenet_zhu", 10, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "victim.pt"
        result = train_centrally("lenet_zhu", public, None, epochs=1, batch_size=64, lr=0.05, seed=0, output=out,
                                 log=lambda _m: None)
        print(f"briefly trained victim: train accuracy {result['train_accuracy']:.2f}", flush=True)
        return float_state(build_model("lenet_zhu", 10, seed=0, checkpoint=out))


def client_update(clients, global_state, ids, cfg: TrainConfig, seed: int):
    """The client's round by the platform's client code, as the server observes it."""
    view = ServerView(ModelSpec("lenet_zhu", 10, (3, 32, 32)), (clients.mean, clients.std), THREAT)
    return observed_round(view, build_model("lenet_zhu", 10, seed=0), global_state, clients, ids, cfg, seed=seed,
                          server_round=1, client_id=0)[0]


def run_setting(clients, global_state, trained: bool, epochs: int, batch: int, images: int, iterations: int,
                methods: dict, seed: int = 0, setting: str = "grid") -> list[dict]:
    cfg = TrainConfig(mode="fedavg", lr=0.1, epochs=epochs, batch_size=batch, num_samples=images, shuffle=True)
    rng = np.random.default_rng([seed, epochs, batch, images])
    ids = np.sort(rng.choice(len(clients), size=images, replace=False))
    observed = client_update(clients, global_state, ids, cfg, seed)
    truth, truth_labels = clients.unit_tensor(ids), clients.labels[ids]
    rows = []
    for method, spec in methods.items():
        t0 = time.time()
        attack = build_attack({**spec, "iterations": iterations})
        attack.check_threat(THREAT)
        rec = attack.reconstruct_many([observed], THREAT, seed=seed)[0]
        scores = score(torch.from_numpy(np.asarray(rec.images, dtype=np.float32)), truth, rec.labels, truth_labels)
        rows.append({"setting": setting, "victim": "trained" if trained else "untrained", "epochs": epochs,
                     "local_batch": batch, "images": images, "steps": epochs * -(-images // batch),
                     "method": method, "iterations": iterations, "recovered": float((scores.psnr >= THRESHOLD).mean()),
                     "partial": float((scores.psnr >= PARTIAL).mean()),
                     "psnr_mean": float(scores.psnr.mean()), "psnr_max": float(scores.psnr.max()),
                     "ssim_mean": float(scores.ssim.mean()), "label_accuracy": scores.label_accuracy,
                     "label_method": rec.label_method, "seconds": time.time() - t0,
                     **{k: v for k, v in rec.columns.items() if k.startswith("tun")}})
        print(f"{rows[-1]['victim']} E{epochs} b{batch} n{images} {method}: {rows[-1]['psnr_mean']:.2f} dB, "
              f"recovered {rows[-1]['recovered']:.2f}, labels {rows[-1]['label_accuracy']:.2f}, "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def table(frame: pd.DataFrame, index: list[str]) -> str:
    methods = [m for m in METHODS if m in set(frame["method"])]
    lines = ["| " + " | ".join(index + [f"{m}: recovered / partial / PSNR / labels" for m in methods]) + " |",
             "|" + "---|" * (len(index) + len(methods))]
    for key, group in frame.groupby(index, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        by = {m: g[["recovered", "partial", "psnr_mean", "label_accuracy"]].mean() for m, g in group.groupby("method")}
        cells = [f"{by[m].recovered:.2f} / {by[m].partial:.2f} / {by[m].psnr_mean:.1f} / {by[m].label_accuracy:.2f}" if m in by else "-"
                 for m in methods]
        lines.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
    return "\n".join(lines)


def summary(grid: pd.DataFrame) -> str:
    """Per victim and method, over the grid's settings: means, and in how many settings it beat replay-IG."""
    base = grid[grid.method == "replay-IG"].set_index(["victim", "epochs", "local_batch", "images"]).psnr_mean
    lines = ["| victim | method | settings | recovered | partial | mean PSNR | best image PSNR | label acc | "
             "PSNR gain over replay-IG | settings it beats replay-IG |", "|" + "---|" * 10]
    for (victim, method), g in grid.groupby(["victim", "method"], sort=False):
        gain = g.set_index(["victim", "epochs", "local_batch", "images"]).psnr_mean - base
        lines.append(f"| {victim} | {method} | {len(g)} | {g.recovered.mean():.3f} | {g.partial.mean():.3f} | "
                     f"{g.psnr_mean.mean():.2f} | {g.psnr_max.max():.2f} | {g.label_accuracy.mean():.2f} | "
                     f"{gain.mean():+.2f} | {int((gain > 0).sum())} |")
    return "\n".join(lines)


def write_tables(frame: pd.DataFrame, path: Path = HERE / "realistic_fedavg.md") -> None:
    start, end = "<!-- tables:start -->", "<!-- tables:end -->"
    grid, head = frame[frame.setting == "grid"], frame[frame.setting == "headline"]
    parts = ["### Summary over the grid", "", summary(grid), "", f"### The grid ({ITERATIONS} iterations per attack; recovered = fraction of the client's images at "
             f"PSNR >= {THRESHOLD:g} dB after matching, partial: at >= {PARTIAL:g} dB, mean PSNR in dB, label accuracy)", ""]
    for name, rows in grid.groupby("victim", sort=False):
        parts += [f"**LeNet (Zhu), {name}**", "", table(rows, ["epochs", "local_batch", "images"]), ""]
    if len(head):
        parts += ["### Headline analogue: 10 epochs x 4 batches of 4 images (means over the clients, seeds)", "",
                  table(head, ["victim", "iterations", "epochs", "local_batch", "images"]), ""]
    text = path.read_text()
    before, rest = text.split(start)
    path.write_text(before + start + "\n" + "\n".join(parts) + end + rest.split(end)[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--victim", choices=["untrained", "trained"])
    parser.add_argument("--headline", action="store_true")
    parser.add_argument("--headline-iterations", type=int, default=HEADLINE_ITERATIONS)
    parser.add_argument("--seeds", type=int, default=1, help="headline: clients (one per seed)")
    parser.add_argument("--untrained-only", action="store_true", help="headline: the untrained victim only")
    parser.add_argument("--tables", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    parts = sorted(HERE.glob("realistic_fedavg.part-*.parquet"))
    if args.tables:
        frame = pd.concat([pd.read_parquet(p) for p in parts]) if parts else pd.read_parquet(ROWS)
        frame.to_parquet(ROWS)
        write_tables(frame)
        return
    torch.set_num_threads(1)
    clients = load_dataset("cifar10", "test")  # the clients' images: not the attacker's public slice
    rows: list[dict] = []
    if args.quick:
        rows += run_setting(clients, victim(False), False, 2, 4, 16, 20, METHODS)
        print(pd.DataFrame(rows)[["method", "recovered", "psnr_mean", "label_accuracy", "seconds"]])
        return
    if args.victim:
        trained = args.victim == "trained"
        state = victim(trained)
        for images in (16, 64):
            for batch in (4, 16):
                for epochs in (1, 2, 5):
                    rows += run_setting(clients, state, trained, epochs, batch, images, ITERATIONS, METHODS)
                    pd.DataFrame(rows).to_parquet(HERE / f"realistic_fedavg.part-{args.victim}.parquet")
    if args.headline:
        rows = []
        for trained in (False,) if args.untrained_only else (False, True):
            for seed in range(args.seeds):
                rows += run_setting(clients, victim(trained), trained, 10, 4, 16, args.headline_iterations,
                                    {m: METHODS[m] for m in ("replay-IG", "fedavg_leakage")}, seed=seed,
                                    setting="headline")
                pd.DataFrame(rows).to_parquet(
                    HERE / f"realistic_fedavg.part-headline-{args.headline_iterations}.parquet")


if __name__ == "__main__":
    main()
