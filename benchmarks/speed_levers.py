"""Speed levers for Inverting Gradients on LeNet(Zhu) at 8 restarts, measured in one run, next to breaching 0.1.2.

    FEDSIM_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/speed_levers.py --threads 1 \\
        --breaching-python /tmp/bvenv/bin/python

Rows per batch size (same target FedSGD gradient of CIFAR-10 test images, as in attack_speed.py):

- ``stacked`` (fedsim's default ``auto`` path for small BatchNorm-free victims) and ``vmap``;
- ``vmap + compile`` with an empty inductor cache (cold: what the first attack of a shape pays) and again in a new
  process on the warm cache (``TORCHINDUCTOR_CACHE_DIR`` persists between runs; what every later attack pays);
- ``fused round``: the updates of ``--clients`` clients of one round inverted as one computation (the attacker
  pool's ``reconstruct_many``), per image-iteration against one client at a time;
- ``step alone``: the stacked path's loss-and-gradient function called directly, no optimiser, projection or
  bookkeeping around it (if it costs what the whole iteration costs, the loop adds nothing and the step is the
  floor of this path);
- breaching, one restart after another.

"break-even iterations" is compile seconds / (ms saved per iteration): a compiled attack pays only past it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attack_speed import make_case, run_breaching  # noqa: E402
from attacker.engine import AttackEngine, InversionProblem, VictimSimulator  # noqa: E402
from fedsim.contract import build_attack  # noqa: E402
from fedsim.training import TrainConfig, step_schedule  # noqa: E402

SPEC = {"name": "inverting_gradients", "tv": 1e-2}


def problem_for(batch: int, clients: int):
    """``clients`` independent problems (each its own images) sharing one public model."""
    model, _, _, _, _, mean, std = make_case("lenet_zhu", batch, 64)
    cfg = TrainConfig(mode="fedsgd", lr=1.0, batch_size=batch, num_samples=batch)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    updates, labels = [], []
    from fedsim.data import load_dataset

    data = load_dataset("cifar10", "test")
    for c in range(clients):
        idx = list(range(c * batch, (c + 1) * batch))
        x, y = data.model_input(idx), data.label_tensor(idx)
        updates.append({k: v.detach() for k, v in sim.update(x, y).items()})
        labels.append(y)
    stacked = {k: torch.stack([u[k] for u in updates]) for k in updates[0]}
    return model, sim, InversionProblem(sim, stacked, torch.stack(labels), (3, 32, 32), mean, std)


def engine_spec(restarts: int, iterations: int, **extra):
    attack = build_attack({**SPEC, **extra, "restarts": restarts, "iterations": iterations, "trace_every": 0})
    return replace(attack.engine_spec(), update_scale=1.0)


def timed_run(problem, restarts: int, iterations: int, **extra) -> tuple[float, float]:
    """(seconds of a 2-iteration warm-up, which includes any compile; ms per iteration of the timed run)."""
    t0 = time.perf_counter()
    AttackEngine(engine_spec(restarts, 2, **extra), seed=0).run(problem)
    warm = time.perf_counter() - t0
    result = AttackEngine(engine_spec(restarts, iterations, **extra), seed=0).run(problem)
    return warm, 1000 * result.seconds / iterations


def floor_ms(batch: int, restarts: int, repeats: int = 100) -> float:
    """The stacked path's loss and gradient for all candidates (victim forward, double backward, cosine matching,
    TV), called directly: no optimiser, no projection, no bookkeeping."""
    _, _, problem = problem_for(batch, 1)
    engine = AttackEngine(engine_spec(restarts, 1, batching="stacked"), seed=0)
    space = engine.default_space(problem)
    variables = space.init(1, restarts, torch.Generator().manual_seed(0))
    step, _ = engine._executors(problem, restarts, space)
    aux = dict(problem.aux) or {"_": torch.zeros(1)}
    anchors = torch.zeros(1, restarts, problem.batch_size, *problem.image_shape)
    args = (variables, problem.labels, problem.targets, aux, anchors)
    step(*args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step(*args)
    return 1000 * (time.perf_counter() - t0) / repeats


def one(args) -> dict:
    """A single measurement (run in its own process for the compile rows)."""
    torch.set_num_threads(args.threads)
    _, _, problem = problem_for(args.batch, args.clients)
    extra = json.loads(args.extra)
    warm, ms = timed_run(problem, args.restarts_, args.iterations, **extra)
    return {"warm_s": warm, "ms": ms}


def subprocess_one(batch: int, clients: int, restarts: int, iterations: int, threads: int, extra: dict,
                   env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", "--batch", str(batch), "--clients", str(clients), "--restarts-",
           str(restarts), "--iterations", str(iterations), "--threads", str(threads), "--extra", json.dumps(extra)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4, help="clients fused in the fused-round row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--breaching-python", default=os.environ.get("BREACHING_PYTHON", ""))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--restarts-", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    torch.set_num_threads(args.threads)
    R, N = args.restarts, args.iterations
    print(f"\nIG, LeNet(Zhu), {R} restarts, {N} iterations, {args.threads} thread(s); ms per iteration of all restarts\n")
    print("| batch | path | ms/it | img-it/s | vs breaching | compile s | break-even iterations |")
    print("|---|---|---|---|---|---|---|")
    for B in (int(b) for b in args.batches.split(",")):
        rows = []
        base = subprocess_one(B, 1, R, N, args.threads, {"batching": "stacked"})
        rows.append(("stacked (default)", base["ms"], B * R, None))
        vmap = subprocess_one(B, 1, R, N, args.threads, {"batching": "vmap"})
        rows.append(("vmap", vmap["ms"], B * R, None))
        with tempfile.TemporaryDirectory() as cache:
            env = {"TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
                   "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
            cold = subprocess_one(B, 1, R, N, args.threads, {"compile": True}, env)
            warm = subprocess_one(B, 1, R, N, args.threads, {"compile": True}, env)
        rows.append(("vmap + compile, cold cache", cold["ms"], B * R, cold["warm_s"] - vmap["warm_s"]))
        rows.append(("vmap + compile, warm cache", warm["ms"], B * R, warm["warm_s"] - vmap["warm_s"]))
        fused = subprocess_one(B, args.clients, R, N, args.threads, {"batching": "stacked"})
        rows.append((f"fused round ({args.clients} clients, stacked)", fused["ms"], args.clients * B * R, None))
        rows.append(("step alone (stacked, no optimiser)", floor_ms(B, R), B * R, None))
        breach = None
        if args.breaching_python:
            model, update, gradient, labels, unit, mean, std = make_case("lenet_zhu", B, 64)
            breach, _, _ = run_breaching(args.breaching_python, "invertinggradients", model, gradient, labels, mean,
                                         std, "lenet_zhu", 64, R, N, 1e-2)
        for name, ms, images, compile_s in rows:
            rate = 1000 * images / ms
            vs = f"{rate / (1000 * B * R / breach):.2f}x" if breach else ""
            saved = base["ms"] - ms
            even = f"{1000 * compile_s / saved:.0f}" if compile_s is not None and saved > 0 else ""
            print(f"| {B} | {name} | {ms:.1f} | {rate:.0f} | {vs} | {'' if compile_s is None else f'{compile_s:.0f}'} "
                  f"| {even} |")
        if breach:
            print(f"| {B} | breaching 0.1.2 | {breach:.1f} | {1000 * B * R / breach:.0f} | 1.00x | | |")


if __name__ == "__main__":
    main()
