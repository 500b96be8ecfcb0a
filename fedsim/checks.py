"""Pre-flight checks: what would otherwise fail (or hang) after Ray has started, found before any work starts.

Each raises ``ValueError`` with one line naming the offending key and value.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def check_device_name(device: str, key: str = "device") -> str:
    """Syntax only (a config may be written on a machine other than the one that runs it)."""
    if not isinstance(device, str) or not DEVICE.match(device):
        raise ValueError(f"{key}: unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    return device


def check_device(device: str, key: str = "device") -> None:
    """The device exists on this machine: ``cuda`` needs a GPU torch can see, ``cuda:N`` an existing index."""
    check_device_name(device, key)
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{key}={device!r} but torch sees no CUDA GPU on this machine; use cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ValueError(f"{key}={device!r} but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}='mps' but the MPS backend is not available here; use cpu")


def check_resources(*, cpus: float, gpus: float, client_cpus: float, client_gpus: float, attacker_gpus: float,
                    attacker_resources: dict[str, float] | None = None, custom: dict[str, float] | None = None,
                    where: str = "this machine") -> None:
    """What clients and attacker workers ask of Ray fits what it has (an unschedulable actor waits forever)."""
    if client_cpus > cpus:
        raise ValueError(f"ray.client_cpus={client_cpus:g} but {where} has {cpus:g} CPUs")
    if client_gpus > 0 and gpus < client_gpus:
        raise ValueError(f"ray.client_gpus={client_gpus:g} but {where} has {gpus:g} GPUs")
    if attacker_gpus > 0 and gpus < attacker_gpus:
        raise ValueError(f"attack.gpus_per_worker={attacker_gpus:g} but {where} has {gpus:g} GPUs")
    for name, amount in (attacker_resources or {}).items():
        have = (custom or {}).get(name, 0.0)
        if have < amount:
            raise ValueError(f"attack.resources.{name}={amount:g} but {where} offers {have:g} of {name!r}")


def load_state_dict_file(path: str | Path, key: str = "model.checkpoint") -> dict:
    """A state dict saved with torch.save, loaded with ``weights_only=True``; one line for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ValueError(f"{key}: {path} holds objects other than tensors (refused by weights_only=True)") from None
        raise ValueError(f"{key}: {path} is not a torch checkpoint ({first[:120]})") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file can fail anywhere in the unpickler (KeyError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{key}: {path} is not a readable torch checkpoint ({first[:120]})") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{key}: {path} is not a state dict (a mapping of names to tensors)")
    return state


def load_into(model: nn.Module, state: dict, path: str | Path, name: str, key: str = "model.checkpoint") -> None:
    """Load strictly; a checkpoint of another architecture or size is named, not a torch traceback."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}" + ("..." if len(missing) > 3 else "")] if missing else []) + \
                ([f"unexpected {unexpected[:3]}" + ("..." if len(unexpected) > 3 else "")] if unexpected else [])
        raise ValueError(f"{key}: {path} does not fit model {name!r} ({'; '.join(parts)})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{key}: {path} does not fit model {name!r} ({k}: shape {tuple(v.shape)} in the "
                             f"checkpoint, {tuple(expected[k].shape)} in the model)")
    model.load_state_dict(state, strict=True)
