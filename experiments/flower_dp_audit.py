"""What does each of Flower's DP options protect against the server itself?

The example app (examples/flower-app) audited by fedsim under ``flwr run`` (simulation runtime, a local SuperLink in
a private FLWR_HOME), once per privacy setting: no defense, Flower's ``DifferentialPrivacyServerSideFixedClipping``,
``DifferentialPrivacyClientSideFixedClipping`` + ``fixedclipping_mod``, ``LocalDpMod`` at several epsilons, and
fedsim's top-k mod. Each setting runs twice: an attacked run (every client trains on ``--images`` images, one local
step, Inverting Gradients on ``--attacked`` replies a round) for PSNR / SSIM per round, and a utility run (the whole
partition, no attack) for the model's test accuracy.

    FEDSIM_DATA_DIR=../shared/data python experiments/flower_dp_audit.py --out experiments/flower_dp_audit.rows.parquet

Rows: one per (setting, round, attacked client) with psnr/ssim/label accuracy and the round's test accuracy of the
attacked run, plus one ``utility`` row per setting (round = last) with the utility run's test accuracy.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

import pandas as pd

from fedsim.flwr_local import flwr_env, flwr_run, stop_processes_mentioning

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-app"

# (label, run config of the app's privacy option)
SETTINGS = [
    ("no defense", "privacy='none'"),
    # Central DP's noise goes on the aggregate: std z * C / n per coordinate with n = 4 clients here, so z = 1
    # (std 0.25) wipes out this model (a later update is exactly zero and Flower's clipping divides by its norm)
    ("server-side fixed clipping (C=1, z=0.01)", "privacy='server-fixed-clipping' clipping-norm=1.0 noise-multiplier=0.01"),
    ("client-side fixed clipping (C=1, z=0.01)", "privacy='client-fixed-clipping' clipping-norm=1.0 noise-multiplier=0.01"),
    ("server-side fixed clipping (C=1, z=1)", "privacy='server-fixed-clipping' clipping-norm=1.0 noise-multiplier=1.0"),
    ("LocalDpMod (C=1, eps=10000)", "privacy='local-dp' clipping-norm=1.0 local-dp-epsilon=10000.0"),
    ("LocalDpMod (C=1, eps=1000)", "privacy='local-dp' clipping-norm=1.0 local-dp-epsilon=1000.0"),
    ("LocalDpMod (C=1, eps=100)", "privacy='local-dp' clipping-norm=1.0 local-dp-epsilon=100.0"),
    ("fedsim top-k mod (10%)", "privacy='topk' topk-fraction=0.1"),
]


def run_app(env: dict, cwd: Path, run_config: str, nodes: int) -> None:
    run = flwr_run(APP, run_config, env=env, cwd=cwd, supernodes=nodes, timeout=7200)
    if run.status != "finished:completed":
        raise RuntimeError(f"flwr run {run.status} ({run_config}):\n{run.log[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "flower_dp_audit.rows.parquet")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--images", type=int, default=1, help="training images per client in the attacked run")
    parser.add_argument("--attacked", type=int, default=2, help="replies attacked per round")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--utility-rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="labels (prefixes) of the settings to run")
    args = parser.parse_args()
    data_dir = os.environ.get("FEDSIM_DATA_DIR")
    if not data_dir:
        raise SystemExit("set FEDSIM_DATA_DIR to the folder with cifar10_train_0-3999.npz")
    work = Path(tempfile.mkdtemp(prefix="flower-dp-audit-"))
    audit = (APP / "audit.toml").read_text().replace(
        "iterations = 200", f"iterations = {args.iterations}").replace(
        "attacked_per_round = 1", f"attacked_per_round = {args.attacked}")
    rows = []
    for label, privacy in SETTINGS:
        if args.only and not any(label.startswith(p) for p in args.only):
            continue
        slug = "".join(c if c.isalnum() else "-" for c in label)[:40]
        cwd = work / slug
        cwd.mkdir()
        top = "attacked_per_round = " + str(args.attacked) + "\n"
        (cwd / "attack.toml").write_text(audit.replace(top, top + 'name = "attack"\n'))
        # the utility run: the same audit without attacks, for its rounds table (the app's evaluate_fn accuracy)
        (cwd / "utility.toml").write_text(audit.replace(top, top + 'name = "utility"\n').replace(
            audit[audit.index("attacks = "):audit.index("\n", audit.index("attacks = "))], "attacks = []"))
        home = cwd / "flwr-home"
        env = flwr_env(home)
        common = f"data-dir='{data_dir}' num-sampled-clients={args.nodes} seed=0 {privacy}"
        t0 = time.time()
        failures = []
        try:
            for what, run_config in (("attack", f"{common} num-server-rounds={args.rounds} "
                                               f"max-train-examples={args.images} batch-size={args.images} "
                                               f"fedsim-audit='{cwd / 'attack.toml'}'"),
                                     ("utility", f"{common} num-server-rounds={args.utility_rounds} "
                                                 f"max-train-examples=0 batch-size=32 "
                                                 f"fedsim-audit='{cwd / 'utility.toml'}'")):
                try:
                    run_app(env, cwd, run_config, args.nodes)
                except RuntimeError as err:  # the setting's own failure is a result too: say which and why
                    reason = [line for line in str(err).splitlines() if "Error" in line][-1:] or ["failed"]
                    failures.append((what, reason[0].strip()))
                    print(f"{label}: the {what} run failed: {reason[0].strip()}", flush=True)
        finally:
            stop_processes_mentioning(str(home), signal.SIGTERM)
        run_dir = cwd / "fedsim-audits" / "attack"
        leakage = pd.read_parquet(run_dir / "leakage.parquet") if (run_dir / "leakage.parquet").is_file() \
            else pd.DataFrame(columns=["round", "client_id", "psnr_mean", "ssim_mean", "label_accuracy", "status"])
        rounds = pd.read_parquet(run_dir / "rounds.parquet").set_index("round")
        for row in leakage.itertuples():
            rows.append({"setting": label, "kind": "attack", "round": int(row.round), "client_id": int(row.client_id),
                         "psnr": float(row.psnr_mean), "ssim": float(row.ssim_mean),
                         "label_accuracy": float(row.label_accuracy), "status": row.status,
                         "test_accuracy": float(rounds.test_accuracy.get(int(row.round), float("nan")))})
        utility = pd.read_parquet(cwd / "fedsim-audits" / "utility" / "rounds.parquet").sort_values("round")
        accuracy = float(utility.test_accuracy.iloc[-1])
        rows.append({"setting": label, "kind": "utility", "round": int(utility["round"].iloc[-1]), "client_id": -1,
                     "psnr": float("nan"), "ssim": float("nan"), "label_accuracy": float("nan"),
                     "status": "; ".join(f"{what} run failed: {why}" for what, why in failures) or "ok",
                     "test_accuracy": accuracy})
        print(f"{label}: {time.time() - t0:.0f} s, PSNR {leakage.psnr_mean.mean():.2f} dB, "
              f"utility accuracy {accuracy:.3f}", flush=True)
        pd.DataFrame(rows).to_parquet(args.out)  # after every setting: a crash keeps what was measured
    print(summary(pd.DataFrame(rows)))


def summary(rows: pd.DataFrame) -> str:
    attack = rows[rows.kind == "attack"].groupby("setting", sort=False).agg(
        psnr=("psnr", "mean"), psnr_std=("psnr", "std"), ssim=("ssim", "mean"), labels=("label_accuracy", "mean"),
        n=("psnr", "size"))
    utility = rows[rows.kind == "utility"].set_index("setting").test_accuracy.rename("utility accuracy")
    return attack.join(utility).to_string(float_format=lambda v: f"{v:.3f}")


if __name__ == "__main__":
    main()
