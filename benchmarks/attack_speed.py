"""Attack speed and quality: fedsim's engine next to breaching 0.1.2 on the same victim and target update.

Attacks: Inverting Gradients (breaching ``invertinggradients``), DLG (``deepleakage``, L-BFGS, joint labels) and
GradInversion (``seethroughgradients``: L2 + TV + L2 prior + BatchNorm statistics against the model's running
buffers; fedsim with ``bn_source = "running"``, the same target). Both tools attack the identical FedSGD gradient
of CIFAR-10 test images 0..B-1 (random images if FEDSIM_DATA_DIR is unset) for the same number of iterations (an
L-BFGS iteration is one step of up to 20 gradient evaluations in both). breaching runs in its own venv
(``--breaching-python``; ``python -m venv V && V/bin/pip install torch==2.14.1 torchvision==0.29.1
breaching==0.1.2``). Prints a markdown table: ms per iteration (all restarts), image-iterations per second
(batch x restarts / time per iteration), speed-up, PSNR of each tool's chosen reconstruction, and gradient
evaluations (fedsim: of all candidates at once; breaching: per restart, counted as victim forward passes). L-BFGS
ends a step early for a restart whose stopping test fires, so under DLG the two counts can differ.

    python benchmarks/attack_speed.py --breaching-python /path/to/venv/bin/python [--attacks ig,dlg,gradinversion]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.contract import build_attack  # noqa: E402
from attacker.engine import AttackEngine, InversionProblem, VictimSimulator  # noqa: E402
from fedsim.metrics import score  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.training import TrainConfig, step_schedule  # noqa: E402

# attack -> (fedsim spec, breaching config, [(model, width, iterations)])
SETUPS = {
    "ig": ({"name": "inverting_gradients", "tv": 1e-2}, "invertinggradients",
           [("lenet_zhu", 64, 300), ("convnet", 64, 4), ("resnet18", 64, 3)]),
    # breaching's L-BFGS is torch's without a line search: the same here, so both do the same work per iteration
    "dlg": ({"name": "dlg", "labels": "joint", "lr": 1.0, "line_search": "none"}, "deepleakage",
            [("lenet_zhu", 64, 30)]),
    "gradinversion": ({"name": "gradinversion", "bn_source": "running"}, "seethroughgradients",
                      [("convnet", 16, 100)]),
}


def make_case(model_name: str, batch: int, width: int):
    model = build_model(model_name, 10, width=width, seed=0)
    if os.environ.get("FEDSIM_DATA_DIR"):
        data = load_dataset("cifar10", "test")
        idx = list(range(batch))
        x, y, unit, mean, std = data.model_input(idx), data.label_tensor(idx), data.unit_tensor(idx), data.mean, data.std
    else:
        g = torch.Generator().manual_seed(0)
        unit = torch.rand(batch, 3, 32, 32, generator=g)
        mean, std = (0.5,) * 3, (0.5,) * 3
        x, y = (unit - 0.5) / 0.5, torch.arange(batch) % 10
    cfg = TrainConfig(mode="fedsgd", lr=1.0, batch_size=batch, num_samples=batch)
    update = {k: v.detach() for k, v in VictimSimulator(model, step_schedule(cfg), cfg.lr).update(x, y).items()}
    gradient = [-update[k] for k, _ in model.named_parameters()]  # lr 1: the gradient is minus the update
    return model, update, gradient, y, unit, mean, std


def run_fedsim(spec: dict, model, update, labels, mean, std, restarts: int, iterations: int):
    attack = build_attack({**spec, "restarts": restarts, "iterations": iterations, "trace_every": 0})
    cfg = TrainConfig(mode="fedsgd", lr=1.0, batch_size=len(labels), num_samples=len(labels))
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    aux = {}
    if spec["name"] == "gradinversion":
        state = model.state_dict()
        for i, layer in enumerate(sim.bn_layers):
            aux[f"bn.mean.{i}"] = state[f"{layer}.running_mean"][None]
            aux[f"bn.var.{i}"] = state[f"{layer}.running_var"][None]
    problem = InversionProblem(sim, {k: v[None] for k, v in update.items()}, labels[None], (3, 32, 32), mean, std,
                               aux=aux)
    engine_spec = replace(attack.engine_spec(), update_scale=1.0)
    AttackEngine(replace(engine_spec, iterations=2), seed=0).run(problem)  # warm-up
    result = AttackEngine(engine_spec, seed=0).run(problem)
    return 1000 * result.seconds / iterations, result.images[0], result.evaluations


def run_breaching(python: str, config: str, model, gradient, labels, mean, std, model_name, width, restarts,
                  iterations, tv):
    with tempfile.TemporaryDirectory() as tmp:
        case, out = Path(tmp) / "case.pt", Path(tmp) / "images.pt"
        torch.save({"model": model_name, "num_classes": 10, "width": width, "state": model.state_dict(),
                    "gradient": gradient, "labels": labels, "shape": (3, 32, 32), "mean": mean, "std": std,
                    "bn_mode": "train"}, case)  # make_case's client step: BatchNorm on batch statistics
        done = subprocess.run([python, str(ROOT / "benchmarks" / "breaching_side.py"), "--case", str(case),
                               "--attack", config, "--restarts", str(restarts), "--iterations", str(iterations),
                               "--tv", str(tv), "--out", str(out)], capture_output=True, text=True, timeout=7200)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "breaching failed")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        return report["ms_per_iteration"], torch.load(out), report["evaluations_per_restart"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="ig,dlg,gradinversion")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--restarts", default="1,8")
    parser.add_argument("--iterations", type=int, default=0, help="override every setup's iteration count")
    parser.add_argument("--models", default="", help="only these victims, e.g. lenet_zhu (default: every setup's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="fedsim attacks with compile=true (torch.compile of "
                        "the batched step; compile time is paid in the warm-up and not counted)")
    parser.add_argument("--breaching-python", default=os.environ.get("BREACHING_PYTHON", ""))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("| attack | model | batch | restarts | iterations | fedsim ms/it | breaching ms/it | fedsim img-it/s "
          "| breaching img-it/s | speed-up | fedsim PSNR | breaching PSNR | evaluations fedsim / breaching |")
    print("|" + "---|" * 13)
    for attack_name in args.attacks.split(","):
        spec, config, models = SETUPS[attack_name]
        spec = {**spec, "compile": args.compile}
        for model_name, width, iters in models:
            if args.models and model_name not in args.models.split(","):
                continue
            iters = args.iterations or iters
            for batch in [int(b) for b in args.batches.split(",")]:
                model, update, gradient, labels, truth, mean, std = make_case(model_name, batch, width)
                for restarts in [int(r) for r in args.restarts.split(",")]:
                    ours, images, our_evals = run_fedsim(spec, model, update, labels, mean, std, restarts, iters)
                    our_psnr = float(score(images, truth, labels.numpy(), labels.numpy()).psnr.mean())
                    theirs, their_psnr, their_evals = float("nan"), float("nan"), float("nan")
                    if args.breaching_python:
                        try:
                            theirs, their_images, their_evals = run_breaching(
                                args.breaching_python, config, model, gradient, labels, mean, std, model_name, width,
                                restarts, iters, spec.get("tv", 1e-2))
                            their_psnr = float(score(their_images, truth, labels.numpy(), labels.numpy()).psnr.mean())
                        except Exception as err:  # noqa: BLE001 - report and keep benchmarking
                            print(f"breaching failed on {attack_name}/{model_name}/{batch}/{restarts}: {err}",
                                  file=sys.stderr)
                    work = batch * restarts
                    print(f"| {attack_name} | {model_name}-{width} | {batch} | {restarts} | {iters} | {ours:.1f} | "
                          f"{theirs:.1f} | {1000 * work / ours:.0f} | {1000 * work / theirs:.0f} | "
                          f"{theirs / ours:.2f}x | {our_psnr:.2f} | {their_psnr:.2f} | {our_evals} / {their_evals:.0f} |",
                          flush=True)


if __name__ == "__main__":
    main()
