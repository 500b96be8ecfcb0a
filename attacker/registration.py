"""Image registration for GradInversion's group consistency, on kornia.

Transform family: **translation**. Restarts of one inversion mostly disagree by where the object sits (convolutions
and pooling make the gradient nearly shift-invariant), so translation is the ambiguity to remove; it has two
parameters, which a noisy 32x32 candidate can still determine, while similarity or homography models would also fit
noise (rotating or scaling one candidate towards a blurry mean). Transforms are 3x3 matrices in kornia's normalised
coordinates ([-1, 1]), so warping and inverting need no pixel bookkeeping.
"""

from __future__ import annotations

import torch
from kornia.geometry.transform import homography_warp, pyrdown


def register_translation(moving: torch.Tensor, fixed: torch.Tensor, iterations: int = 60,
                         pyramid_levels: int = 3, lr: float = 2e-2) -> torch.Tensor:
    """For each pair (N, C, H, W), the translation (N, 3, 3) that warps ``moving`` onto ``fixed``.

    kornia's ImageRegistrator algorithm (coarse-to-fine image pyramid, L1 photometric loss, Adam on the transform
    parameters), run for all N pairs at once: ImageRegistrator itself registers one pair per call (~1 s each)."""
    moving, fixed = moving.detach(), fixed.detach()
    shift = torch.zeros(len(moving), 2, device=moving.device, requires_grad=True)
    optimizer = torch.optim.Adam([shift], lr=lr)
    pyramid_m, pyramid_f = [moving], [fixed]
    for _ in range(pyramid_levels - 1):
        if min(pyramid_m[-1].shape[-2:]) < 8:
            break
        pyramid_m.append(pyrdown(pyramid_m[-1]))
        pyramid_f.append(pyrdown(pyramid_f[-1]))
    with torch.enable_grad():
        for m, f in zip(reversed(pyramid_m), reversed(pyramid_f)):  # coarse to fine; normalised shifts carry over
            for _ in range(iterations):
                optimizer.zero_grad()
                loss = (warp_translation(m, translation_matrix(shift)) - f).abs().mean(dim=(1, 2, 3)).sum()
                loss.backward()
                optimizer.step()
    return translation_matrix(shift.detach())


def translation_matrix(shift: torch.Tensor) -> torch.Tensor:
    """(N, 2) normalised shifts -> (N, 3, 3) homogeneous translations."""
    matrix = torch.eye(3, device=shift.device, dtype=shift.dtype).repeat(len(shift), 1, 1)
    matrix[:, :2, 2] = shift  # differentiable in ``shift``
    return matrix


def warp_translation(images: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Warp (N, C, H, W) images by (N, 3, 3) transforms (border pixels repeat)."""
    return homography_warp(images, transforms, images.shape[-2:], normalized_coordinates=True,
                           padding_mode="border")


def invert(transforms: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(transforms)


def pixel_shift(transforms: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(dx, dy) in pixels of normalised translations (align_corners convention: 2 / (size - 1) per pixel)."""
    return torch.stack([transforms[:, 0, 2] * (width - 1) / 2, transforms[:, 1, 2] * (height - 1) / 2], dim=1)
