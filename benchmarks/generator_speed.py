"""GI-w and GI-z/w weight search: fedsim's batched generator copies against the reference code's way.

The GIAS reference code keeps one deep copy of the generator per image (and per restart), generates the batch with
a Python loop over the copies, matches the batch's gradient and steps one Adam over all copies, restart after
restart. That baseline is implemented here with plain autograd (``reference``). fedsim vmaps the per-image copies
(``torch.func.functional_call``) and stacks restarts (and independent updates) as engine candidates (``fedsim``).
Both start from the same generator weights and latents, attack the same FedSGD gradient of CIFAR-10 test images
0..B-1 (LeNet(Zhu), untrained) with 1 - cosine + TV 1e-4 and Adam lr 1e-3, and run the same iterations. Prints a
markdown table: ms per iteration (all restarts), speed-up, and the PSNR of each side's best restart.

    FEDSIM_DATA_DIR=../shared/data python benchmarks/generator_speed.py [--batches 4,8] [--restarts 1,2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacker.engine import (AttackEngine, EngineSpec, InversionProblem, OptimizerSpec, VictimSimulator,  # noqa: E402
                             cosine_distance, total_variation)
from attacker.generators import build_generator, load_prior  # noqa: E402
from attacker.gias import WeightSpace  # noqa: E402
from fedsim.data import load_dataset  # noqa: E402
from fedsim.metrics import psnr  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.training import TrainConfig, step_schedule  # noqa: E402


def case(batch: int):
    data = load_dataset("cifar10", "test")
    idx = list(range(batch))
    x, y, unit = data.model_input(idx), data.label_tensor(idx), data.unit_tensor(idx)
    model = build_model("lenet_zhu", 10, seed=0)
    cfg = TrainConfig(lr=1.0, batch_size=batch, num_samples=batch)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    update = {k: v.detach() for k, v in sim.update(x, y).items()}
    return data, model, sim, update, y, unit


def run_fedsim(generator, sim, update, labels, data, restarts: int, iterations: int, latents: torch.Tensor):
    problem = InversionProblem(sim, {k: v[None] for k, v in update.items()}, labels[None], (3, 32, 32), data.mean,
                               data.std)
    spec = EngineSpec(regularizers=(("tv", 1e-4),), optimizer=OptimizerSpec(name="adam", lr=1e-3),
                      iterations=iterations, restarts=restarts, boxed=False, trace_every=0)
    space = WeightSpace(problem, generator, per_image=True, latents=latents[None])
    AttackEngine(replace(spec, iterations=2), seed=0).run(problem, space)  # warm-up
    t0 = time.perf_counter()
    result = AttackEngine(spec, seed=0).run(problem, space)
    return (time.perf_counter() - t0) / iterations, result.images[0]


def run_reference(generator, model, update, labels, data, restarts: int, iterations: int, latents: torch.Tensor):
    """The reference code's loop: per restart, one generator deep copy per image, images generated one copy after
    another, one Adam over all copies of that restart."""
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    params = list(model.parameters())
    target = [update[k] for k, _ in model.named_parameters()]
    copies = [[copy.deepcopy(generator).eval().requires_grad_(True) for _ in range(len(labels))] for _ in range(restarts)]
    optimizers = [torch.optim.Adam([p for g in gs for p in g.parameters()], lr=1e-3) for gs in copies]

    def step(r: int) -> torch.Tensor:
        optimizers[r].zero_grad()
        images = torch.cat([g(latents[r, k][None]) for k, g in enumerate(copies[r])])
        x = ((images + 1) / 2 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        sim = {str(i): -g for i, g in enumerate(grads)}  # an lr-1 update is minus the gradient
        tgt = {str(i): t for i, t in enumerate(target)}
        total = cosine_distance(sim, tgt) + 1e-4 * total_variation(x)
        total.backward()
        optimizers[r].step()
        return total.detach()

    for r in range(restarts):  # warm-up, as on the fedsim side
        step(r)
    t0 = time.perf_counter()
    for _ in range(iterations):
        losses = [step(r) for r in range(restarts)]
    seconds = (time.perf_counter() - t0) / iterations
    best = int(torch.stack(losses).argmin())
    with torch.no_grad():
        images = torch.cat([g(latents[best, k][None]) for k, g in enumerate(copies[best])])
    return seconds, (images + 1) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,8")
    parser.add_argument("--restarts", default="1,2")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prior", default=str(ROOT / "experiments/priors/dcgan_cifar10_train4000.pt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = load_prior(args.prior, 32, 3)[0] if args.prior else build_generator("dcgan", 32, 3)
    print("| batch | restarts | iterations | fedsim ms/it | reference ms/it | speed-up | fedsim PSNR | reference PSNR |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        data, model, sim, update, labels, unit = case(batch)
        for restarts in (int(r) for r in args.restarts.split(",")):
            latents = torch.randn(restarts, batch, 100, generator=torch.Generator().manual_seed(1))
            ours, ours_img = run_fedsim(generator, sim, update, labels, data, restarts, args.iterations, latents)
            ref, ref_img = run_reference(generator, model, update, labels, data, restarts, args.iterations, latents)
            print(f"| {batch} | {restarts} | {args.iterations} | {ours * 1e3:.1f} | {ref * 1e3:.1f} | {ref / ours:.2f}x | "
                  f"{float(psnr(ours_img, unit).mean()):.2f} | {float(psnr(ref_img, unit).mean()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
