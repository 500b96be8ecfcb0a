"""The run directory: leakage rows appended as they arrive, per-round utility, grids, the resolved config.

Parquet files are rewritten whole and swapped in atomically (write to a temporary file, then ``os.replace``), so a
run killed at any moment leaves a readable table with every row finished before the kill.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .backlog import ModelCheckpoints, UpdateQueue


class ParquetTable:
    """An append-only table persisted atomically after every append."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.rows: list[dict] = []
        if resume and self.path.is_file():
            self.rows = pd.read_parquet(self.path).to_dict("records")

    def append(self, row: dict | object) -> None:
        record = asdict(row) if is_dataclass(row) else dict(row)
        with self._lock:
            self.rows.append(record)
            frame = pd.DataFrame(self.rows)
            tmp = self.path.with_suffix(".parquet.tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, self.path)

    def keep(self, predicate) -> None:
        """Keep only the rows ``predicate`` accepts (persisted)."""
        with self._lock:
            kept = [r for r in self.rows if predicate(r)]
            if len(kept) == len(self.rows):
                return
            self.rows = kept
            tmp = self.path.with_suffix(".parquet.tmp")
            pd.DataFrame(self.rows).to_parquet(tmp, index=False)
            os.replace(tmp, self.path)

    def frame(self) -> pd.DataFrame:
        with self._lock:
            return pd.DataFrame(self.rows)


class DirectoryInUse(ValueError):
    """Another live process writes this run directory; one line."""


class RunLock:
    """An exclusive lock on a run directory for as long as this process writes it (``flock``: the kernel releases it
    when the process ends, however it ends), so two runs never write one directory at the same time."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / ".lock"
        self._file = None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise DirectoryInUse(f"{root} is in use by another fedsim process (pid {holder}); wait for it or stop "
                                 f"it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None


class RunDirectory:
    """``leakage.parquet`` and ``rounds.parquet``, ``grids/``, ``reconstructions/``, ``config.json``, the attacker's
    saved state (``attacker/``), the global model per round (``checkpoints/``) and the attack backlog (``queue/``);
    locked for as long as this process writes it."""

    def __init__(self, root: Path, resume: bool = False) -> None:
        self.root = Path(root)
        self.lock = RunLock(self.root)  # before anything is removed or written
        self.attacker = self.root / "attacker"  # saved attacker state (fedsim.pool), one folder per stateful attack
        self.reconstructions = self.root / "reconstructions"  # each scored batch beside its ground truth
        if not resume:  # a fresh run must not start from, or show, an earlier run's model, backlog or state
            for name in ("attacker", "checkpoints", "queue", "grids", "reconstructions"):
                shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / "grids").mkdir(parents=True, exist_ok=True)
        self.checkpoints = ModelCheckpoints(self.root / "checkpoints")
        self.queue = UpdateQueue(self.root / "queue")
        self.leakage = ParquetTable(self.root / "leakage.parquet", resume)
        self.rounds = ParquetTable(self.root / "rounds.parquet", resume)
        self.failures = ParquetTable(self.root / "failures.parquet", resume)  # clients that raised

    def finished_round(self) -> int:
        """The last round with both its row and its model checkpoint (-1: none, a fresh start). Rows, checkpoints
        and queued updates of later rounds belong to a round that did not finish and are dropped: it runs again."""
        have = set(self.checkpoints.rounds())
        recorded = {int(r["round"]) for r in self.rounds.rows}
        done, r = -1, 0
        while r in have and r in recorded:
            done, r = r, r + 1
        self.rounds.keep(lambda row: int(row["round"]) <= done)
        self.failures.keep(lambda row: int(row["round"]) <= done)
        self.checkpoints.drop_after(done)
        self.queue.drop_after(done)
        return done

    def close(self) -> None:
        """Done writing: another process may open the directory."""
        self.lock.release()

    def write_config(self, config: dict) -> None:
        (self.root / "config.json").write_text(json.dumps(config, indent=2, default=str))


def save_grid(path: Path, originals: torch.Tensor | None, rows: list[torch.Tensor], pad: int = 2) -> None:
    """A PNG with one image per column: ground truth on top (if given), then each row of reconstructions."""
    from PIL import Image
    from torchvision.utils import make_grid

    stacks = ([originals] if originals is not None else []) + list(rows)
    if not stacks:
        return
    ncol = max(len(s) for s in stacks)
    cells = []
    for s in stacks:
        s = s.float().clamp(0, 1)
        if len(s) < ncol:
            s = torch.cat([s, torch.ones(ncol - len(s), *s.shape[1:])])
        cells.append(s)
    grid = make_grid(torch.cat(cells), nrow=ncol, padding=pad, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    scale = max(1, 96 // stacks[0].shape[-1])  # small images are upscaled so a person can see them
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
