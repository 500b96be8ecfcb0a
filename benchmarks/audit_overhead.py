"""The audit's overhead on a user's Flower app: examples/flower-app under ``flwr run`` (simulation runtime, one
local SuperLink), audited with attacks off against the same app unaudited, in one run of this script; and the tee's
own cost per round, measured in-process on the example's model and replies.

    FEDSIM_DATA_DIR=../shared/data python benchmarks/audit_overhead.py [--rounds 20] [--repeats 2]

Wall time is Flower's "Strategy execution finished in X s" (ServerApp start-up and Ray start-up outside), runs
alternate plain / audited so load drifts hit both. Prints two markdown tables.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"
sys.path.insert(0, str(APP))


def strategy_seconds(log: str) -> float:
    found = re.findall(r"Strategy execution finished in ([0-9.]+)s", log)
    if not found:
        raise RuntimeError(f"no strategy time in the log:\n{log[-2000:]}")
    return float(found[-1])


def federation(args, data_dir: str) -> list[tuple[str, float]]:
    from fedsim.flwr_local import flwr_env, flwr_run, stop_processes_mentioning

    work = Path(tempfile.mkdtemp(prefix="audit-overhead-"))
    audit = (APP / "audit.toml").read_text()
    start = audit.index("attacks = ")
    (work / "off.toml").write_text(audit.replace(audit[start:audit.index("\n", start)], "attacks = []"))
    home = work / "flwr-home"
    env = flwr_env(home)
    common = (f"num-server-rounds={args.rounds} data-dir='{data_dir}' max-train-examples={args.examples} "
              f"batch-size=32")
    out = []
    try:
        for repeat in range(args.repeats):
            for label, key in (("plain", ""), ("audited, attacks off", str(work / "off.toml"))):
                run = flwr_run(APP, f"{common} fedsim-audit='{key}'", env=env, cwd=work, supernodes=args.nodes)
                if run.status != "finished:completed":
                    raise RuntimeError(run.log[-3000:])
                out.append((label, strategy_seconds(run.log)))
                print(f"repeat {repeat}: {label}: {out[-1][1]:.1f} s", flush=True)
    finally:
        stop_processes_mentioning(str(home), signal.SIGTERM)
    return out


def tee_cost(examples: int, repeats: int = 20) -> list[tuple[str, float]]:
    """Per round with two replies: the side channel's recording and encoding on a client, and the server's side:
    pairing, decoding, observing, the ground truth, the on-disk queue (the attack itself excluded)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedsim.audit.app import AuditFile, DeclaredRecipe, _Recorder
    from fedsim.audit.auditor import AuditPlan
    from fedsim.contract import ServerView
    from fedsim.protocol import SIDE, read_reply, read_side, without_side, arrays_to_numpy
    from fedsim.results import RunDirectory
    from flowerapp.task import Net

    settings = AuditFile.load(APP / "audit.toml")
    spec = settings.model_spec(APP / "audit.toml")
    plan = AuditPlan(ServerView(spec, (settings.data.mean, settings.data.std), settings.threat_model()), (), 0,
                     recipe=DeclaredRecipe(settings.recipe, {"local-epochs": 1, "batch-size": 32}, APP))
    net = Net()
    sent = RecordDict({"arrays": ArrayRecord(net.state_dict()), "config": ConfigRecord({"lr": 0.05})})
    images = torch.randn(examples, 3, 32, 32)
    labels = torch.randint(0, 10, (examples,))
    record_times, server_times = [], []
    store = RunDirectory(Path(tempfile.mkdtemp(prefix="tee-")) / "run")
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            replies = []
            for client in range(2):
                recorder = _Recorder()
                for i in range(0, examples, 32):
                    recorder.add(images[i:i + 32], labels[i:i + 32])
                reply = RecordDict({"arrays": ArrayRecord(Net().state_dict()),
                                    "metrics": MetricRecord({"num-examples": examples})})
                reply[SIDE] = recorder.record(client)
                replies.append(reply)
            t1 = time.perf_counter()
            for reply in replies:  # what Auditor.observe does for an attacked reply, and the strip
                arrays = arrays_to_numpy(sent["arrays"])
                view = read_reply(reply, plan.keys)
                config = plan.train_config(dict(sent["config"].items()), view.num_examples)
                observed = plan.view.observe(1, arrays, config, view)
                read_side(reply, 1, plan.view.normalization)
                store.queue.put(observed)
                without_side(reply)
            t2 = time.perf_counter()
            record_times.append((t1 - t0) / 2)
            server_times.append(t2 - t1)
    finally:
        store.close()
    return [("client: record_batch + side channel (per client)", statistics.median(record_times)),
            ("server: tee for 2 attacked replies (per round)", statistics.median(server_times))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--examples", type=int, default=256, help="training images per client")
    parser.add_argument("--skip-federation", action="store_true")
    args = parser.parse_args()
    data_dir = os.environ.get("FEDSIM_DATA_DIR")
    if not data_dir:
        raise SystemExit("set FEDSIM_DATA_DIR")
    torch.set_num_threads(1)
    print("| part | median ms (of 20) |\n|---|---|")
    for label, seconds in tee_cost(args.examples):
        print(f"| {label} | {seconds * 1e3:.1f} |")
    if args.skip_federation:
        return
    runs = federation(args, str(Path(data_dir).resolve()))
    by = {label: [s for lab, s in runs if lab == label] for label, _ in runs}
    plain = float(np.mean(by["plain"]))
    print(f"\n| run ({args.nodes} nodes x {args.examples} images, {args.rounds} rounds) | strategy s (each) | mean | "
          f"ratio |\n|---|---|---|---|")
    for label, values in by.items():
        mean = float(np.mean(values))
        print(f"| {label} | {', '.join(f'{v:.1f}' for v in values)} | {mean:.1f} | {mean / plain:.3f}x |")


if __name__ == "__main__":
    main()
