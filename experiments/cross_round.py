"""Cross-round inversion (GIAS appendix D): one client's images inverted jointly from 1, 2, 4 and 8 of its rounds.

A federation of 5 clients on an untrained LeNet(Zhu), FedSGD batch 4; the observed client keeps the same 4
CIFAR-10 test images every round while the other 4 clients (fresh training images each round) move the FedAvg model.
After 8 rounds the server attacks the client's round-8 update with Inverting Gradients on the sum of its last k
updates' matching costs, each under that round's public model (k = 1 is plain IG). Labels are shared (known), so the
rows isolate image recovery. Equal iterations for every k. Writes experiments/cross_round.md.

    FEDSIM_DATA_DIR=../shared/data python experiments/cross_round.py [--clients 0-3,4-7] [--iterations 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from attacker.history import Kept
from fedsim.client import client_round
from fedsim.config import build_threat
from fedsim.contract import ModelSpec, ServerView, build_attack
from fedsim.data import load_dataset
from fedsim.metrics import score
from fedsim.models import build_model
from fedsim.protocol import read_reply, reply_content
from fedsim.training import TrainConfig, float_state

HERE = Path(__file__).resolve().parent


def federation(test, train, ids, rounds, seed):
    """The observed client's update in every round, under a FedAvg model the other clients move."""
    model = build_model("lenet_zhu", 10, seed=seed)
    threat = build_threat([], labels="known")
    view = ServerView(ModelSpec("lenet_zhu", 10, (3, 32, 32)), (test.mean, test.std), threat)
    cfg = TrainConfig(lr=0.1, batch_size=len(ids), num_samples=len(ids))
    rng = np.random.default_rng(seed)
    observed = []
    for r in range(1, rounds + 1):
        state = float_state(model)
        reply = client_round(model, state, test, np.array(ids), cfg, [], threat, seed=seed, server_round=r, client_id=0)
        observed.append(view.observe(r, {k: v.numpy() for k, v in state.items()}, cfg.to_record(),
                                     read_reply(reply_content(reply, 0, state))))
        new_states = [reply.state]
        for c in range(1, 5):
            other = rng.choice(len(train), size=len(ids), replace=False)
            new_states.append(client_round(model, state, train, other, cfg, [], threat, seed=seed, server_round=r,
                                           client_id=c).state)
        model.load_state_dict({k: sum(s[k] for s in new_states) / len(new_states) for k in state}, strict=False)
    return observed, threat, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="0-3,4-7", help="each client's test images, e.g. 0-3,4-7")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--ks", default="1,2,4,8")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    test, train = load_dataset("cifar10", "test"), load_dataset("cifar10", "train")
    ks = [int(k) for k in args.ks.split(",")]
    results: dict[int, list] = {k: [] for k in ks}
    seconds: dict[int, list] = {k: [] for k in ks}
    for c, span in enumerate(args.clients.split(",")):
        lo, hi = (int(v) for v in span.split("-"))
        ids = list(range(lo, hi + 1))
        observed, threat, cfg = federation(test, train, ids, max(ks), seed=c)
        truth = test.unit_tensor(ids)
        for k in ks:
            attack = build_attack({"name": "cross_round", "rounds_used": k, "iterations": args.iterations,
                                   "restarts": 1})
            for obs in observed[len(observed) - k:-1]:
                attack.remember(Kept(obs, np.asarray(obs.shared["labels"]), cfg))
            t0 = time.perf_counter()
            rec = attack.reconstruct_many([observed[-1]], threat, seed=0)[0]
            seconds[k].append(time.perf_counter() - t0)
            s = score(torch.from_numpy(rec.images), truth, rec.labels, test.labels[ids])
            results[k] += s.psnr.tolist()
            print(f"client {c} (images {span}), k={k}: rounds {rec.extra['rounds']}, PSNR {np.mean(s.psnr):.2f}",
                  flush=True)
    lines = ["# Cross-round inversion (GIAS appendix D): one client's images from k of its rounds", "",
             "Regenerate: `python experiments/cross_round.py` " + f"(clients `{args.clients}`, {args.iterations} "
             "iterations of Inverting Gradients at every k).", "",
             "Untrained LeNet(Zhu), FedSGD batch 4, 5 clients; the observed client keeps the same CIFAR-10 test "
             "images every round while the others (fresh training images) move the FedAvg model; labels shared. "
             "The server attacks the round-8 update jointly with the client's previous k - 1 updates, each matched "
             "under its own round's public model. PSNR per image (Hungarian-matched), mean ± std over all images.", "",
             "| rounds used (k) | PSNR (dB) | images | s / attack |", "|---|---|---|---|"]
    for k in ks:
        v = np.array(results[k])
        lines.append(f"| {k} | {v.mean():.2f} ± {v.std():.2f} | {len(v)} | {np.mean(seconds[k]):.0f} |")
    lines.append("")
    (HERE / "cross_round.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
