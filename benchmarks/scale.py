"""Scale: many virtual clients over many rounds, a few sampled and one attacked per round.

    FEDSIM_DATA_DIR=../shared/data python benchmarks/scale.py [--clients 1000] [--rounds 50] [--iterations 300]

Prints wall time, the driver's resident memory (VmRSS of this process, sampled whenever a round row lands) and
Ray's object-store use over the run, as a per-round table (every 5th round) and a summary line. The driver holds the
ServerApp thread, the tee, the evaluator and the attacker pool's collector; a leak shows as RSS growing per round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def object_store_mb() -> float:
    import ray

    try:
        total = ray.cluster_resources().get("object_store_memory", 0.0)
        free = ray.available_resources().get("object_store_memory", 0.0)
        return (total - free) / 2**20
    except Exception:  # noqa: BLE001 - Ray not up yet or shutting down
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--attacked", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()

    from fedsim.config import load_config
    from fedsim.driver import run_federation

    samples: list[tuple[int, float, float, float]] = []  # round, seconds since start, driver RSS MB, store MB
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "experiments" / "quickstart.toml", [
            f'output_dir="{tmp}"', 'name="scale"', f"federation.num_clients={args.clients}",
            f"federation.clients_per_round={args.sampled}", f"federation.rounds={args.rounds}",
            f"attack.clients_per_round={args.attacked}", f"attacks.0.iterations={args.iterations}",
            "attacks.0.restarts=1", "attack.workers=1", 'data.partition="iid"', "data.test_samples=200"])
        rounds_file = Path(tmp) / "scale" / "rounds.parquet"
        stop = threading.Event()
        t0 = time.perf_counter()

        def watch() -> None:
            import pandas as pd

            seen = -1
            peak_store = 0.0
            while not stop.is_set():
                store = object_store_mb()
                peak_store = max(peak_store, store if store == store else 0.0)
                try:
                    n = len(pd.read_parquet(rounds_file)) if rounds_file.exists() else 0
                except Exception:  # noqa: BLE001 - being written
                    n = seen + 1
                if n - 1 > seen:
                    seen = n - 1
                    samples.append((seen, time.perf_counter() - t0, rss_mb(), peak_store))
                    peak_store = 0.0
                time.sleep(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        store = run_federation(cfg, show_progress=False)
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join()
        leak = store.leakage.frame()
        rounds = store.rounds.frame()
    print(f"\n{args.clients} clients x {args.rounds} rounds, {args.sampled} sampled, {args.attacked} attacked per "
          f"round (IG {args.iterations} it): wall {wall:.0f} s, {len(rounds) - 1} rounds, {len(leak)} leakage rows "
          f"({(leak.status == 'ok').sum()} ok)\n")
    print("| round | s since start | driver RSS MB | object store MB (peak since last row) |")
    print("|---|---|---|---|")
    for r, t, rss, st in samples:
        if r in (0, 1) or r % 5 == 0 or r == samples[-1][0]:
            print(f"| {r} | {t:.0f} | {rss:.0f} | {st:.1f} |")
    late = [rss for r, _, rss, _ in samples if r >= 5]
    if late:
        print(f"\ndriver RSS from round 5 on: {min(late):.0f}..{max(late):.0f} MB "
              f"(growth {max(late) - late[0]:+.0f} MB over {samples[-1][0] - 5} rounds)")


if __name__ == "__main__":
    main()
