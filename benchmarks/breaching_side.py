"""Runs inside a separate venv that has breaching 0.1.2 (never a fedsim dependency).

Reads a case file written by attack_speed.py (victim weights, target gradient, labels, normalisation), runs
breaching's Inverting Gradients for a fixed number of iterations and restarts, and prints one JSON line with the
wall time and the reconstruction. The victim architecture comes from fedsim.models (plain torch modules, imported
from the repository path), so both tools attack the identical network and update.
"""

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedsim.models import build_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--case", required=True)
parser.add_argument("--restarts", type=int, default=1)
parser.add_argument("--iterations", type=int, default=10)
parser.add_argument("--tv", type=float, default=1e-2)
parser.add_argument("--attack", default="invertinggradients",
                    help="breaching attack config: invertinggradients, deepleakage, seethroughgradients")
parser.add_argument("--out", default="")
args = parser.parse_args()

import breaching  # noqa: E402

torch.set_num_threads(int(torch.get_num_threads()))
case = torch.load(args.case, weights_only=False)
model = build_model(case["model"], case["num_classes"], width=case["width"])
model.load_state_dict(case["state"])
model.eval()
# Gradient evaluations: breaching runs its victims as deep copies of ``model`` (made from here on), which keep this
# hook. L-BFGS ends a step early when a stopping test fires, so its count can differ from fedsim's.
forwards = [0]
model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

with contextlib.redirect_stdout(io.StringIO()):
    overrides = [f"restarts.num_trials={args.restarts}", f"optim.max_iterations={args.iterations}",
                 f"optim.callback={10**9}"]
    if args.attack == "invertinggradients":
        overrides.append(f"regularization.total_variation.scale={args.tv}")
    cfg = breaching.get_attack_config(args.attack, overrides=overrides)
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg,
                                                dict(dtype=torch.float, device=torch.device("cpu")))
class Metadata(dict):
    """breaching reads data metadata both as attributes and as keys (it is an OmegaConf config there)."""

    __getattr__ = dict.__getitem__


metadata = Metadata(shape=tuple(case["shape"]), mean=case["mean"], std=case["std"], modality="vision",
                    classes=case["num_classes"], task="classification")
# The target update was computed with the client's BatchNorm mode. breaching simulates eval mode when the server
# payload carries buffers and train mode (batch statistics) when it carries none, so send buffers only for eval.
train_mode = case.get("bn_mode", "train") == "train" and any(
    isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
payload = [dict(parameters=[p.detach().clone() for p in model.parameters()],
                buffers=None if train_mode else [b.detach().clone() for b in model.buffers()], metadata=metadata)]
shared = [dict(gradients=[g.clone() for g in case["gradient"]], buffers=None,
               metadata=dict(num_data_points=len(case["labels"]),
                             # DLG optimises labels jointly: breaching refuses given labels there
                             labels=None if args.attack == "deepleakage" else case["labels"].clone(),
                             local_hyperparams=None))]
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    result, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
seconds = time.perf_counter() - start
images = (result["data"].detach() * torch.tensor(case["std"]).view(1, -1, 1, 1)
          + torch.tensor(case["mean"]).view(1, -1, 1, 1)).clamp(0, 1)
if args.out:
    torch.save(images, args.out)
print(json.dumps({"seconds": seconds, "ms_per_iteration": 1000 * seconds / args.iterations,
                  "evaluations_per_restart": forwards[0] / args.restarts}))
