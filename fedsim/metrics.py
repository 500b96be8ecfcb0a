"""Leakage metrics on [0, 1] pixels, with reconstructions matched to ground truth by Hungarian assignment.

Conventions (stated because papers differ): PSNR is per image, ``10 log10(1 / MSE)`` on [0, 1] pixels of all
channels, then averaged over the batch (``psnr_mean``) or maximised (``psnr_best``). SSIM is torchmetrics' Gaussian
SSIM (11x11, sigma 1.5) per image. LPIPS is AlexNet-LPIPS (lower is better), NaN when its backbone weights are not
in the torch cache. Label accuracy is the overlap of the recovered and true label multisets divided by batch size.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, C, H, W) tensors in [0, 1]."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-20))).float()


def pairwise_psnr(rec: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """[i, j] = PSNR(rec_i, gt_j)."""
    mse = (rec.double()[:, None] - gt.double()[None]).pow(2).flatten(2).mean(2)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-20))).float()


def match(rec: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """Index into ``rec`` for each ground-truth image, maximising total PSNR (Hungarian assignment)."""
    scores = pairwise_psnr(rec, gt).numpy()
    rows, cols = linear_sum_assignment(-scores)
    order = np.empty(len(gt), dtype=np.int64)
    order[cols] = rows
    return order


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure  # ~1 s to import: only when scoring

    return structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, reduction="none")


class LPIPSMetric:
    """AlexNet LPIPS if its ImageNet weights are already in the torch cache; otherwise NaN and one warning."""

    _instance: "LPIPSMetric | None" = None

    def __init__(self) -> None:
        self.model = None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
        if cached.is_file():
            import lpips

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        else:
            log.warning("LPIPS reported as NaN: AlexNet weights not found at %s (no download is attempted here)",
                        cached)

    @classmethod
    def shared(cls) -> "LPIPSMetric":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return torch.full((len(a),), float("nan"))
        return self.model(a.float() * 2 - 1, b.float() * 2 - 1, normalize=False).flatten()


@dataclass
class Scores:
    psnr: np.ndarray  # per ground-truth image, after matching
    ssim: np.ndarray
    lpips: np.ndarray
    label_accuracy: float
    order: np.ndarray  # reconstruction index matched to each ground-truth image

    def summary(self) -> dict[str, float]:
        def mean(v):
            return float(np.mean(v)) if len(v) else float("nan")

        def best(v, lower=False):
            if not len(v) or np.all(np.isnan(v)):
                return float("nan")
            return float(np.nanmin(v) if lower else np.nanmax(v))

        return dict(psnr_mean=mean(self.psnr), psnr_best=best(self.psnr), ssim_mean=mean(self.ssim),
                    ssim_best=best(self.ssim), lpips_mean=mean(self.lpips), lpips_best=best(self.lpips, lower=True),
                    label_accuracy=self.label_accuracy)


def label_accuracy(recovered: np.ndarray, truth: np.ndarray | None) -> float:
    if truth is None or len(truth) == 0:
        return float("nan")
    overlap = Counter(recovered.tolist()) & Counter(truth.tolist())
    return sum(overlap.values()) / len(truth)


def score(rec_images: torch.Tensor, gt_images: torch.Tensor, rec_labels: np.ndarray,
          gt_labels: np.ndarray | None) -> Scores:
    """Match a reconstructed batch to its ground truth and compute every metric."""
    rec_images, gt_images = rec_images.float().clamp(0, 1), gt_images.float()
    if rec_images.shape != gt_images.shape:
        raise ValueError(f"reconstruction shape {tuple(rec_images.shape)} != ground truth {tuple(gt_images.shape)}")
    order = match(rec_images, gt_images)
    matched = rec_images[torch.from_numpy(order)]
    return Scores(
        psnr=psnr(matched, gt_images).numpy(),
        ssim=ssim(matched, gt_images).numpy(),
        lpips=LPIPSMetric.shared()(matched, gt_images).numpy(),
        label_accuracy=label_accuracy(np.asarray(rec_labels), gt_labels),
        order=order,
    )
