"""Async overlap: wall time of a federation with its attacks against max(federation alone, attacks alone).

    FEDSIM_DATA_DIR=../shared/data python benchmarks/async_overlap.py [--clients 8] [--rounds 5] [--iterations 600]

Three measurements of the same experiment (quickstart settings, ``--attacked`` clients attacked per round):

1. federation alone: ``run_federation`` with no attacks (the tee off);
2. federation + attacks: ``run_federation`` as configured; the teed updates stay in the run's queue on disk (the
   benchmark keeps them instead of dropping each round when its attacks are done);
3. attacks alone: a fresh Ray and attacker pool given exactly those queued updates, until drained.

Each includes its own Ray start-up. Perfect overlap makes (2) equal max(1, 3); the goal is at most +10%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def configure(out: Path, args, attacks: bool):
    from fedsim.config import load_config

    overrides = [f'output_dir="{out}"', f'name="attacks_{attacks}"', f"federation.num_clients={args.clients}",
                 f"federation.clients_per_round={args.sampled}", f"federation.rounds={args.rounds}",
                 f"attack.clients_per_round={args.attacked}", f"attacks.0.iterations={args.iterations}",
                 f"attacks.0.restarts={args.restarts}", f"attack.workers={args.workers}", "data.test_samples=200",
                 f"ray.num_cpus={args.client_cores}"]
    if not attacks:
        overrides.append("attacks=[]")
    return load_config(ROOT / "experiments" / "quickstart.toml", overrides)


def federation(cfg) -> tuple[float, Path, float]:
    """(wall seconds, run directory, seconds until round 1's row: the first teed update exists from then on)."""
    from fedsim.driver import run_federation

    t0, wall0 = time.perf_counter(), time.time()
    store = run_federation(cfg, show_progress=False)
    rounds = store.rounds.frame()
    return time.perf_counter() - t0, store.root, float(rounds.loc[rounds["round"] == 1, "time"].iloc[0]) - wall0


def attacks_alone(cfg, queue_root: Path) -> tuple[float, int]:
    import ray

    from fedsim.backlog import UpdateQueue
    from fedsim.driver import _ray_settings
    from fedsim.federation import attacker_gpus
    from fedsim.pool import AttackerPool
    from fedsim.seeds import attacker_root

    queue = UpdateQueue(queue_root)
    observed = [obs for r in queue.rounds() for obs in queue.observed(r)]
    rows = []
    t0 = time.perf_counter()
    ray.init(**{k: v for k, v in _ray_settings(cfg, None).items() if v is not None})
    try:
        pool = AttackerPool(cfg.attacks, cfg.threat_model(), lambda obs, key, outcome: rows.append(key),
                            executor=cfg.attack.executor, workers=cfg.attack.workers, threads=cfg.attack.threads,
                            device=cfg.device, seed_root=attacker_root(cfg.seed), gpus_per_worker=attacker_gpus(cfg))
        by_round: dict[int, list] = {}
        for obs in observed:
            by_round.setdefault(obs.round, []).append(obs)
        for server_round in sorted(by_round):  # as the tee hands them over: one round at a time
            pool.submit(by_round[server_round])
        pool.drain()
        pool.close()
    finally:
        ray.shutdown()
    return time.perf_counter() - t0, len(observed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sampled", type=int, default=4)
    parser.add_argument("--attacked", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--client-cores", type=int, default=1,
                        help="CPUs Ray gives the client actors (ray.num_cpus); attacker workers take none of them, "
                             "so on 2 cores the attacker gets the other one")
    args = parser.parse_args()

    from fedsim.backlog import UpdateQueue

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sim, _, _ = federation(configure(out, args, attacks=False))
        keep = UpdateQueue.drop
        UpdateQueue.drop = lambda self, server_round: None  # keep the teed updates for the attacks-alone run
        try:
            cfg = configure(out, args, attacks=True)
            both, root, first = federation(cfg)
        finally:
            UpdateQueue.drop = keep
        alone, n = attacks_alone(cfg, root / "queue")
    bound = max(sim, alone)
    print(f"\n{args.clients} clients, {args.sampled} sampled, {args.rounds} rounds; {n} updates attacked "
          f"(IG {args.iterations} it x {args.restarts} restarts, {args.workers} worker); clients on "
          f"{args.client_cores} of {os.cpu_count()} cores\n")
    print("| federation alone s | attacks alone s | max s | federation + attacks s | over max | round 1 done at s |")
    print("|---|---|---|---|---|---|")
    print(f"| {sim:.1f} | {alone:.1f} | {bound:.1f} | {both:.1f} | {100 * (both / bound - 1):+.1f}% | {first:.1f} |")


if __name__ == "__main__":
    main()
