"""What a resumed run needs on disk: the global model after every round and the attack backlog.

``ModelCheckpoints``: ``checkpoints/round_NNN.pt``, the global arrays the server holds after round NNN (000 is the
initial model), written before the round's row, so a row always has its checkpoint.

``UpdateQueue``: every observed update is written to ``queue/round_NNN/observed_C.pt`` the moment the server tees
it, and its audit record (the evaluator's ground truth: sample ids or recorded images) beside it as ``audit_C.pt``, so a backlog of attacks
survives the driver. A round's folder is removed once every configured attack has a row for every update of the
round. Files are tensors and primitives only (loaded with ``weights_only=True``) and are swapped in atomically.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .contract import AuditRecord, ModelSpec, ObservedUpdate

ROUND_DIR = re.compile(r"round_(\d+)$")
ROUND_FILE = re.compile(r"round_(\d+)\.pt$")


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _walk(value, leaf):
    """``leaf`` applied to every value inside nested dicts, lists and tuples (containers keep their type)."""
    if isinstance(value, dict):
        return {k: _walk(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v, leaf) for v in value)
    return leaf(value)


def _tensor_leaf(value):  # weights_only files hold tensors, not numpy arrays
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value.item() if isinstance(value, np.generic) else value


def _array_leaf(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def observed_to_record(observed: ObservedUpdate) -> dict:
    record = {name: _walk(getattr(observed, name), _tensor_leaf) for name in
              ("round", "client_id", "normalization", "global_state", "update", "train_config", "num_examples",
               "shared", "defenses")}
    record["model"] = asdict(observed.model)
    return record


def observed_from_record(record: dict) -> ObservedUpdate:
    fields = {k: _walk(v, _array_leaf) for k, v in record.items() if k != "model"}
    spec = dict(record["model"])
    spec["image_shape"] = tuple(spec["image_shape"])
    spec["args"] = tuple(tuple(pair) for pair in spec.get("args", ()))
    return ObservedUpdate(model=ModelSpec(**spec), **fields)


def audit_from_record(record: dict) -> AuditRecord:
    raw = _walk(record, _array_leaf)
    return AuditRecord(**{**raw, "sample_ids": tuple(raw["sample_ids"]), "step_ids": tuple(raw["step_ids"])})


class ModelCheckpoints:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, server_round: int) -> Path:
        return self.root / f"round_{server_round:03d}.pt"

    def save(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        _save_atomic({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}, self.path(server_round))

    def load(self, server_round: int) -> dict[str, np.ndarray]:
        state = torch.load(self.path(server_round), map_location="cpu", weights_only=True)
        return {k: v.numpy() for k, v in state.items()}

    def rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.glob("round_*.pt") if (m := ROUND_FILE.search(p.name)))

    def drop_after(self, server_round: int) -> None:
        for r in self.rounds():
            if r > server_round:
                self.path(r).unlink(missing_ok=True)


class UpdateQueue:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, server_round: int) -> Path:
        return self.root / f"round_{server_round:03d}"

    def put(self, observed: ObservedUpdate) -> None:
        folder = self._dir(observed.round)
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(observed_to_record(observed), folder / f"observed_{observed.client_id}.pt")

    def put_audit(self, audit: AuditRecord) -> None:
        folder = self._dir(audit.round)
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(_walk(asdict(audit), _tensor_leaf), folder / f"audit_{audit.client_id}.pt")

    def rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := ROUND_DIR.search(p.name)))

    def observed(self, server_round: int) -> list[ObservedUpdate]:
        files = sorted(self._dir(server_round).glob("observed_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        return [observed_from_record(torch.load(p, map_location="cpu", weights_only=True)) for p in files]

    def audits(self, server_round: int) -> list[AuditRecord]:
        return [audit_from_record(torch.load(p, map_location="cpu", weights_only=True))
                for p in sorted(self._dir(server_round).glob("audit_*.pt"))]

    def drop(self, server_round: int) -> None:
        shutil.rmtree(self._dir(server_round), ignore_errors=True)

    def drop_after(self, server_round: int) -> None:
        for r in self.rounds():
            if r > server_round:
                self.drop(r)
