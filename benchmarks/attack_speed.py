"""Inverting Gradients speed: fedsim's batched engine next to breaching 0.1.2 on the same victim and target update.

For each victim, batch size and restart count, both tools attack the identical FedSGD gradient of CIFAR-10 test
images 0..B-1 (random images if FEDSIM_DATA_DIR is unset). breaching runs in its own venv (``--breaching-python``;
install it with ``python -m venv V && V/bin/pip install torch==2.14.1 torchvision==0.29.1 breaching==0.1.2``);
without it only fedsim's column is filled. Prints a markdown table: ms per attack iteration (all restarts), image-
iterations per second (batch x restarts / time per iteration), and the speed-up.

    python benchmarks/attack_speed.py --breaching-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacker.engine import AttackEngine, EngineSpec, InversionProblem, OptimizerSpec, VictimSimulator  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.training import TrainConfig, step_schedule  # noqa: E402

DEFAULT_ITERS = {"lenet_zhu": 60, "convnet": 4, "resnet18": 3}


def images_and_labels(batch: int):
    if os.environ.get("FEDSIM_DATA_DIR"):
        data = load_dataset("cifar10", "test")
        idx = list(range(batch))
        return data.model_input(idx), data.label_tensor(idx), data.mean, data.std
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.arange(batch) % 10, (0.5,) * 3, (0.5,) * 3


def make_case(model_name: str, batch: int, width: int):
    model = build_model(model_name, 10, width=width, seed=0)
    x, y, mean, std = images_and_labels(batch)
    cfg = TrainConfig(mode="fedsgd", lr=1.0, batch_size=batch, num_samples=batch)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    update = {k: v.detach() for k, v in sim.update(x, y).items()}
    gradient = [-update[k] for k, _ in model.named_parameters()]  # lr 1: the gradient is minus the update
    return model, update, gradient, y, mean, std


def time_fedsim(model, update, labels, mean, std, restarts: int, iterations: int, tv: float) -> float:
    cfg = TrainConfig(mode="fedsgd", lr=1.0, batch_size=len(labels), num_samples=len(labels))
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    problem = InversionProblem(sim, {k: v[None] for k, v in update.items()}, labels[None], (3, 32, 32), mean, std)

    def run(iters):
        spec = EngineSpec(objective="cosine", regularizers=(("tv", tv),), optimizer=OptimizerSpec(lr=0.1),
                          iterations=iters, restarts=restarts, trace_every=0)
        return AttackEngine(spec, seed=0).run(problem)

    run(2)  # warm-up (allocator, vmap tracing)
    result = run(iterations)
    return 1000 * result.seconds / iterations


def time_breaching(python: str, model, gradient, labels, mean, std, model_name, width, restarts, iterations, tv):
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.pt"
        torch.save({"model": model_name, "num_classes": 10, "width": width, "state": model.state_dict(),
                    "gradient": gradient, "labels": labels, "shape": (3, 32, 32), "mean": mean, "std": std}, case)
        out = subprocess.run([python, str(ROOT / "benchmarks" / "breaching_side.py"), "--case", str(case),
                              "--restarts", str(restarts), "--iterations", str(iterations), "--tv", str(tv)],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "breaching failed")
        return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_iteration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet_zhu,convnet,resnet18")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--restarts", default="1,8")
    parser.add_argument("--width", type=int, default=64, help="convnet / resnet18 width")
    parser.add_argument("--iterations", type=int, default=0, help="timed iterations (default: per model)")
    parser.add_argument("--tv", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--breaching-python", default=os.environ.get("BREACHING_PYTHON", ""))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    os.environ.update(env_threads)

    rows = []
    header = ("| model | batch | restarts | fedsim ms/it | breaching ms/it | fedsim img-it/s | breaching img-it/s "
              "| speed-up |")
    print(header)
    print("|" + "---|" * 8)
    for model_name in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            model, update, gradient, labels, mean, std = make_case(model_name, batch, args.width)
            for restarts in [int(r) for r in args.restarts.split(",")]:
                iters = args.iterations or DEFAULT_ITERS.get(model_name, 5)
                ours = time_fedsim(model, update, labels, mean, std, restarts, iters, args.tv)
                theirs = float("nan")
                if args.breaching_python:
                    try:
                        theirs = time_breaching(args.breaching_python, model, gradient, labels, mean, std,
                                                model_name, args.width, restarts, iters, args.tv)
                    except Exception as err:  # noqa: BLE001 - report and keep benchmarking
                        print(f"breaching failed on {model_name}/{batch}/{restarts}: {err}", file=sys.stderr)
                work = batch * restarts
                row = (model_name, batch, restarts, ours, theirs, 1000 * work / ours, 1000 * work / theirs,
                       theirs / ours)
                rows.append(row)
                print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.1f} | {row[4]:.1f} | {row[5]:.0f} | {row[6]:.0f} "
                      f"| {row[7]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
