"""The run directory: leakage rows appended as they arrive, per-round utility, grids, the resolved config.

Parquet files are rewritten whole and swapped in atomically (write to a temporary file, then ``os.replace``), so a
run killed at any moment leaves a readable table with every row finished before the kill.
"""

from __future__ import annotations

import hashlib

import json
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass, is_dataclass
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
        record = row.to_row() if hasattr(row, "to_row") else asdict(row) if is_dataclass(row) else dict(row)
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


# What a run writes into its directory. Only these make a directory "hold a run", and only these are removed by
# an overwrite: a sweep's point.json and run.log, or a user's own notes, stay.
RUN_FILES = ("config.json", "leakage.parquet", "rounds.parquet", "failures.parquet", "attacker_workers.json",
             "report.html", "checkpoints", "queue", "grids", "reconstructions", "attacker")
OPEN_MODES = ("new", "resume", "overwrite")


class RunDirectoryError(ValueError):
    """A run directory that cannot be opened as asked (one line, before anything is written)."""


def run_files(root: Path) -> list[str]:
    """The run's own files already in ``root`` (empty: no run there)."""
    return [name for name in RUN_FILES if (Path(root) / name).exists()]


NEW_RUN_HINT = "use --resume to continue it, --overwrite to replace it, or another name"


def open_mode(resume: bool, overwrite: bool, *, flags: str = "--resume and --overwrite") -> str:
    """The open mode two switches ask for (``flags``: how the command names them, for the error)."""
    if resume and overwrite:
        raise RunDirectoryError(f"{flags} exclude each other: continue the run or replace it")
    return "resume" if resume else "overwrite" if overwrite else "new"


def check_open(root: Path, mode: str, *, hint: str = NEW_RUN_HINT, resume_flag: str = "--resume") -> None:
    """Whether ``root`` may be opened in ``mode`` (``new``: it holds no run; ``resume``: it holds one;
    ``overwrite``: anything), as a one-line :class:`RunDirectoryError` (``hint``: what the user can do instead,
    in the words of the command that opens it). Read-only: call it before any work starts."""
    if mode not in OPEN_MODES:
        raise ValueError(f"run directory mode {mode!r}; use one of {', '.join(OPEN_MODES)}")
    root = Path(root)
    if mode == "new" and run_files(root):
        raise RunDirectoryError(f"{root} already holds a run ({describe(root)}); {hint}")
    if mode == "resume" and not (root / "config.json").is_file():
        raise RunDirectoryError(f"{resume_flag}: no run to continue in {root} (it has no config.json); "
                                f"drop {resume_flag} to start one")


def describe(root: Path) -> str:
    """A few words on what a run directory holds (for refusals)."""
    parts = []
    for name, what in (("rounds.parquet", "rounds"), ("leakage.parquet", "leakage rows")):
        path = Path(root) / name
        if path.is_file():
            try:
                parts.append(f"{len(pd.read_parquet(path))} {what}")
            except Exception:  # noqa: BLE001 - an unreadable table is still a table that would be lost
                parts.append(f"an unreadable {name}")
    return ", ".join(parts) or ", ".join(run_files(root))


class RunDirectory:
    """``leakage.parquet`` and ``rounds.parquet``, ``grids/``, ``reconstructions/``, ``config.json``, the attacker's
    saved state (``attacker/``), the global model per round (``checkpoints/``) and the attack backlog (``queue/``);
    locked for as long as this process writes it.

    ``mode``: ``new`` refuses a directory that already holds a run (nothing is lost by a mistyped command),
    ``resume`` needs one and keeps its rows, ``overwrite`` removes the earlier run's files first."""

    def __init__(self, root: Path, mode: str = "new") -> None:
        self.root = Path(root)
        if mode == "resume":
            check_open(self.root, mode)  # before the lock creates the directory
        self.lock = RunLock(self.root)  # before anything is checked, removed or written ("in use" comes first)
        try:
            check_open(self.root, mode)
        except BaseException:
            self.lock.release()
            raise
        self.mode = mode
        self.attacker = self.root / "attacker"  # saved attacker state (fedsim.pool), one folder per stateful attack
        self.reconstructions = self.root / "reconstructions"  # each scored batch beside its ground truth
        if mode == "overwrite":  # the earlier run's files go, all of them (a stale report or grid would mislead)
            for name in RUN_FILES:
                path = self.root / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        resume = mode == "resume"
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


# ------------------------------------------------------------------------------------------------------------
# Attacked batches as the evaluator keeps them, and reading a run directory back (fedsim report, sweeps)


def model_checksum(arrays: dict[str, np.ndarray]) -> str:
    """A short digest of a global model (the ``model_checksum`` column of rounds.parquet): keys and bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


def batch_file_name(round_: int, client_id: int, attack: str) -> str:
    return f"r{round_:03d}_c{client_id}_{attack}.npz"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8."""
    return (images.float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def save_batch(path: Path, ground_truth: torch.Tensor, matched: torch.Tensor, *, psnr: np.ndarray,
               ssim: np.ndarray, lpips: np.ndarray, true_labels: np.ndarray | None,
               recovered_labels: np.ndarray) -> None:
    """One scored batch: image i of ``reconstruction`` is the one matched to ``ground_truth`` i, its scores are
    ``psnr[i]`` etc. (computed on the float images; the stored images are 8-bit for viewing). Atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, ground_truth=to_uint8(ground_truth), reconstruction=to_uint8(matched),
                            psnr=np.asarray(psnr, np.float32), ssim=np.asarray(ssim, np.float32),
                            lpips=np.asarray(lpips, np.float32),
                            true_labels=np.asarray(true_labels if true_labels is not None else [], np.int64),
                            recovered_labels=np.asarray(recovered_labels, np.int64))
    os.replace(tmp, path)


def read_table(path: Path) -> pd.DataFrame:
    """A parquet table of a run, empty if it is missing or being replaced."""
    try:
        return pd.read_parquet(path)
    except (FileNotFoundError, OSError, ValueError):
        return pd.DataFrame()


@dataclass
class Batch:
    """One attacked batch as the evaluator kept it (image i of ``reconstruction`` is matched to ground truth i)."""

    round: int
    client_id: int
    attack: str
    ground_truth: np.ndarray  # (N, H, W, C) uint8
    reconstruction: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    lpips: np.ndarray
    true_labels: np.ndarray
    recovered_labels: np.ndarray


def read_batch(path: Path) -> Batch | None:
    match = re.fullmatch(r"r(\d+)_c(-?\d+)_(.+)\.npz", path.name)
    if not match:
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None  # being written right now, or cut off by a kill: the row is missing too
    return Batch(int(match[1]), int(match[2]), match[3], **arrays)


@dataclass
class RunData:
    root: Path
    config: dict
    leakage: pd.DataFrame
    rounds: pd.DataFrame
    failures: pd.DataFrame
    prior_samples: list[tuple[int, Path]]  # (round, png) of a learnt prior's fixed-latent samples

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.root.name)

    def batch(self, round_: int, client_id: int, attack: str) -> Batch | None:
        path = self.root / "reconstructions" / batch_file_name(round_, client_id, attack)
        return read_batch(path) if path.is_file() else None

    def image_scores(self) -> pd.DataFrame:
        """One row per attacked image of every finished row: round, client_id, attack, image (its index in the
        client's batch, in sample order), psnr, ssim, lpips."""
        parts = []
        for row in self.ok().itertuples():
            b = self.batch(int(row.round), int(row.client_id), str(row.attack))
            if b is None:
                continue
            parts.append(pd.DataFrame({"round": int(row.round), "client_id": int(row.client_id),
                                       "attack": str(row.attack), "image": np.arange(len(b.psnr)),
                                       "psnr": b.psnr.astype(float),
                                       "ssim": b.ssim.astype(float), "lpips": b.lpips.astype(float)}))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            columns=["round", "client_id", "attack", "image", "psnr", "ssim", "lpips"])

    def ok(self) -> pd.DataFrame:
        if not len(self.leakage):
            return self.leakage
        return self.leakage[self.leakage.status == "ok"]


def load_run(root: Path) -> RunData:
    root = Path(root)
    try:
        config = json.loads((root / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        config = {}
    samples = []
    for png in sorted((root / "attacker").glob("*/samples_round_*.png")):
        match = re.search(r"samples_round_(\d+)\.png$", png.name)
        if match:
            samples.append((int(match[1]), png))
    return RunData(root, config, read_table(root / "leakage.parquet"), read_table(root / "rounds.parquet"),
                   read_table(root / "failures.parquet"), samples)
