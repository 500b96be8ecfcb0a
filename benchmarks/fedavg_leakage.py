"""fedavg_leakage: all restarts in one batched computation vs one candidate at a time (the reference code's way,
eth-sri/fedavg_leakage runs its restarts in a Python loop), ms per attack iteration.

    FEDSIM_DATA_DIR=../shared/data python benchmarks/fedavg_leakage.py [--iterations 20] [--restarts 8]

One FedAvg update of CIFAR-10 test images (shuffled local epochs of mini-batches), labels known; both ways run the
same attack code (only the engine's ``batching`` differs: ``auto`` -> stacked candidates, ``loop`` -> plain autograd
per candidate), so the matching losses agree and the ratio is the batching alone.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from fedsim.contract import ThreatModel, build_attack
from fedsim.data import load_dataset
from fedsim.single import SingleUpdateJob, run_single
from fedsim.training import TrainConfig

SETTINGS = [  # (model, images, local batch, epochs)
    ("lenet_zhu", 4, 2, 2),
    ("lenet_zhu", 16, 4, 2),
    ("convnet", 8, 4, 2),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("cifar10", "test")
    print("| model | images | local batch x epochs | restarts | batched ms/it | one at a time ms/it | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for model, images, local_batch, epochs in SETTINGS:
        cfg = TrainConfig(mode="fedavg", lr=0.1, epochs=epochs, batch_size=local_batch, num_samples=images,
                          shuffle=True)
        ms = {}
        for batching in ("auto", "loop"):
            attack = build_attack({"name": "fedavg_leakage", "iterations": args.iterations,
                                   "restarts": args.restarts, "batching": batching})
            with tempfile.TemporaryDirectory() as tmp:
                rows = run_single(SingleUpdateJob(data, model, list(range(images)), images, attack, cfg,
                                                  threat=ThreatModel(labels="known"), width=16), Path(tmp))
            assert rows[0].status == "ok", rows[0].error
            ms[batching] = 1000 * rows[0].attack_seconds / args.iterations
        print(f"| {model}{'-16' if model == 'convnet' else ''} | {images} | {local_batch} x {epochs} | "
              f"{args.restarts} | {ms['auto']:.1f} | {ms['loop']:.1f} | {ms['loop'] / ms['auto']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
