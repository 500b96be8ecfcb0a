"""The evaluator: the only place where reconstructions meet ground truth.

It receives audit records (sample ids) from the server side and reconstructions from the attacker side, fetches the
true images by id, scores them, appends one row per (round, client, attack) and redraws the round's grid. With a
``reconstruction_dir`` it also keeps each scored batch (matched reconstructions beside their ground truth, with
per-image scores) in ``r<round>_c<client>_<attack>.npz``, written before its row, which ``fedsim report`` draws.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .contract import AuditRecord, LeakageRecord, ObservedUpdate, Reconstruction
from .metrics import label_accuracy, score
from .results import batch_file_name, save_batch

NO_GROUND_TRUTH = "no ground truth"  # row status: scored by update fit only (the client recorded no batches)
GroundTruth = Callable[[list[int]], tuple[torch.Tensor, np.ndarray | None]]


class LeakageEvaluator:
    def __init__(self, ground_truth: GroundTruth, sink: Callable[[LeakageRecord], None],
                 grid_dir: Path | None = None, on_row: Callable[[LeakageRecord], None] | None = None,
                 on_audit: Callable[[AuditRecord], None] | None = None,
                 reconstruction_dir: Path | None = None) -> None:
        self.ground_truth = ground_truth
        self.reconstruction_dir = reconstruction_dir
        self.on_audit = on_audit  # e.g. the run directory's queue, so a resumed run can still score
        self.sink = sink
        self.grid_dir = grid_dir
        self.on_row = on_row
        self._audits: dict[tuple[int, int], AuditRecord] = {}
        self._grid_rows: dict[int, dict] = defaultdict(dict)
        self._lock = threading.Lock()

    def register_audit(self, audit: AuditRecord) -> None:
        if self.on_audit:
            self.on_audit(audit)
        with self._lock:
            self._audits[(audit.round, audit.client_id)] = audit

    def record(self, observed: ObservedUpdate, attack: str, outcome: Reconstruction | BaseException) -> LeakageRecord:
        row = LeakageRecord(round=observed.round, client_id=observed.client_id, attack=attack,
                            defenses=";".join(observed.defenses), batch_size=observed.num_examples)
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            with self._lock:
                audit = self._audits[(observed.round, observed.client_id)]
            self._describe(row, outcome)
            if not audit.recorded:  # a Flower app's client that recorded no batches: update fit only
                row.status = NO_GROUND_TRUTH
                return self._emit(row)
            if audit.images is not None:
                gt_images, gt_labels = torch.from_numpy(audit.images), audit.labels
            else:
                gt_images, gt_labels = self.ground_truth(list(audit.sample_ids))
            rec_images = torch.from_numpy(np.array(outcome.images, dtype=np.float32))
            scores = score(rec_images, gt_images, outcome.labels, gt_labels)
            for key, value in scores.summary().items():
                setattr(row, key, value)
            for method, labels in outcome.extra.get("label_candidates", {}).items():
                row.reported[f"label_acc_{method}"] = label_accuracy(np.asarray(labels), gt_labels)
            matched = rec_images[torch.from_numpy(scores.order)]
            self._update_grid(observed, attack, gt_images, matched)
            self._keep_batch(observed, attack, gt_images, gt_labels, matched,
                             np.asarray(outcome.labels), scores)
        except Exception as err:  # noqa: BLE001 - any failure becomes an error row; the run goes on
            row.status = "error"
            row.error = f"{type(err).__name__}: {err}"[:500]
        return self._emit(row)

    @staticmethod
    def _describe(row: LeakageRecord, outcome: Reconstruction) -> None:
        """What needs no ground truth: how the attack ran and how well its reconstruction fits the update."""
        row.label_method = outcome.label_method
        for key in ("update_l2", "update_sign_agreement", "update_cosine_distance"):
            if key in outcome.extra:
                setattr(row, key, outcome.extra[key])
        row.reported.update(outcome.columns)
        row.matching_loss = outcome.loss
        row.attack_seconds = outcome.seconds
        row.iterations = outcome.iterations
        row.restarts = outcome.restarts

    def _emit(self, row: LeakageRecord) -> LeakageRecord:
        self.sink(row)
        if self.on_row:
            self.on_row(row)
        return row

    def _keep_batch(self, observed: ObservedUpdate, attack: str, gt: torch.Tensor, gt_labels: np.ndarray | None,
                    matched: torch.Tensor, labels: np.ndarray, scores) -> None:
        if self.reconstruction_dir is None:
            return
        save_batch(self.reconstruction_dir / batch_file_name(observed.round, observed.client_id, attack),
                   gt, matched, psnr=scores.psnr, ssim=scores.ssim, lpips=scores.lpips,
                   true_labels=gt_labels, recovered_labels=labels)

    def _update_grid(self, observed: ObservedUpdate, attack: str, gt: torch.Tensor, rec: torch.Tensor) -> None:
        if self.grid_dir is None:
            return
        from .results import save_grid

        with self._lock:
            cells = self._grid_rows[observed.round]
            cells.setdefault(observed.client_id, {"gt": gt})[attack] = rec
            snapshot = {c: dict(v) for c, v in sorted(cells.items())}
        attacks = sorted({a for v in snapshot.values() for a in v if a != "gt"})
        originals = torch.cat([v["gt"] for v in snapshot.values()])
        rows = [torch.cat([v.get(a, torch.ones_like(v["gt"])) for v in snapshot.values()]) for a in attacks]
        save_grid(self.grid_dir / f"round_{observed.round:03d}.png", originals, rows)
