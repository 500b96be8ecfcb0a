"""FL overhead: a plain Flower FedAvg app against fedsim (no tee; tee on with the cheapest attack), same clients,
data, victim and rounds. Prints a markdown table: wall time of the simulation call, mean time per round (rounds
2..N, the first pays actor start-up), and the ratios to the plain app.

    FEDSIM_DATA_DIR=../shared/data python benchmarks/fl_overhead.py [--clients 10] [--rounds 5]

The plain app is what a Flower user would write: a ClientApp that loads the arrays, takes one SGD step on its
batch and replies with ArrayRecord + MetricRecord, and a ServerApp that runs ``FedAvg.start`` with a centralised
evaluation. Ray is initialised once per side with the same settings; its start-up is outside the timings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "outside_plugin"))  # outside_mean: the cheapest attack, to switch the tee on


def ray_up():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=256 * 1024 * 1024, _temp_dir=tempfile.mkdtemp(prefix="fsbench-"))


def plain_flower(clients: int, rounds: int, batch: int, seed: int) -> tuple[float, list[float]]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedsim.data import load_dataset
    from fedsim.models import build_model
    from fedsim.training import evaluate_accuracy

    train, test = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")
    parts = np.array_split(np.random.default_rng(seed).permutation(len(train)), clients)
    test_x, test_y = test.model_input(np.arange(200)), test.label_tensor(np.arange(200))
    client_app = ClientApp()

    @client_app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        model = build_model("lenet_zhu", 10, seed=seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        ids = parts[pid][:batch]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(train.model_input(ids)), train.label_tensor(ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": len(ids)})}), reply_to=msg)

    times: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < clients:
            time.sleep(0.2)
        model = build_model("lenet_zhu", 10, seed=seed)

        def evaluate(server_round, arrays):
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            times.append(time.perf_counter())
            return MetricRecord(dict(zip(("accuracy", "loss"), evaluate_accuracy(model, test_x, test_y))))

        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=clients).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds, evaluate_fn=evaluate)

    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}})
    return time.perf_counter() - t0, list(np.diff(times))


def fedsim_run(clients: int, rounds: int, batch: int, seed: int, tee: bool, out: Path) -> tuple[float, list[float]]:
    from fedsim.config import load_config
    from fedsim.driver import run_federation

    overrides = [f'output_dir="{out}"', f'name="tee_{tee}"', f"federation.num_clients={clients}",
                 f"federation.clients_per_round={clients}", f"federation.rounds={rounds}", f"seed={seed}",
                 f"client.batch_size={batch}", 'data.partition="iid"', "data.test_samples=200"]
    overrides += (['attacks=[{name="outside_mean"}]', "attack.clients_per_round=1"] if tee else ["attacks=[]"])
    cfg = load_config(ROOT / "experiments" / "quickstart.toml", overrides)
    t0 = time.perf_counter()
    store = run_federation(cfg, show_progress=False)
    wall = time.perf_counter() - t0
    stamps = store.rounds.frame()["time"].to_numpy()
    return wall, list(np.diff(stamps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import os

    import ray

    os.environ["PYTHONPATH"] = str(ROOT / "tests" / "outside_plugin") + os.pathsep + os.environ.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("plain Flower FedAvg", lambda: plain_flower(args.clients, args.rounds, args.batch, args.seed)),
                         ("fedsim, no tee", lambda: fedsim_run(args.clients, args.rounds, args.batch, args.seed,
                                                               False, Path(tmp))),
                         ("fedsim, tee on (outside_mean)", lambda: fedsim_run(args.clients, args.rounds, args.batch,
                                                                             args.seed, True, Path(tmp)))):
            ray_up()
            wall, per_round = fn()
            if ray.is_initialized():
                ray.shutdown()
            rows.append((name, wall, float(np.mean(per_round[1:])) if len(per_round) > 1 else float("nan")))
            print(f"{name}: {wall:.1f} s, {rows[-1][2]:.2f} s per round", file=sys.stderr, flush=True)
    base_wall, base_round = rows[0][1], rows[0][2]
    print(f"\n{args.clients} clients (all sampled), {args.rounds} rounds, FedSGD batch {args.batch}, LeNet(Zhu)\n")
    print("| run | wall s | s per round (rounds 2..N) | wall ratio | per-round ratio |")
    print("|---|---|---|---|---|")
    for name, wall, per_round in rows:
        print(f"| {name} | {wall:.1f} | {per_round:.3f} | {wall / base_wall:.2f}x | {per_round / base_round:.2f}x |")


if __name__ == "__main__":
    main()
