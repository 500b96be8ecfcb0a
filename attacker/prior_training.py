"""Train a DCGAN prior on public images (the "pretrained prior" an attacker may hold), on CPU in minutes.

Standard DCGAN recipe: Adam (lr 2e-4, betas 0.5/0.999) for generator and discriminator, the non-saturating
logistic loss, images in [-1, 1] with random horizontal flips. The generator is returned in eval mode.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from fedsim.data import ImageData

from .generators import DCGANDiscriminator, build_generator


def train_dcgan(data: ImageData, *, epochs: int, batch_size: int = 64, lr: float = 2e-4, nz: int = 100,
                ngf: int = 64, ndf: int = 64, seed: int = 0,
                on_step: Callable[[int, float, float], None] | None = None) -> tuple[nn.Module, dict]:
    """(generator, history) after ``epochs`` passes over ``data``; ``on_step(step, d_loss, g_loss)`` reports progress."""
    channels, size = data.shape[0], data.shape[1]
    torch.manual_seed(seed)
    generator = build_generator("dcgan", size, channels, seed=seed, nz=nz, ngf=ngf).train()
    discriminator = DCGANDiscriminator(size, channels, ndf)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    images = data.unit_tensor(np.arange(len(data))) * 2 - 1
    rng = torch.Generator().manual_seed(seed)
    history = {"d_loss": [], "g_loss": []}
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=rng)
        for i in range(0, len(images) - batch_size + 1, batch_size):  # full batches: BatchNorm needs them
            real = images[order[i:i + batch_size]]
            flip = torch.rand(len(real), generator=rng) < 0.5
            real = torch.where(flip.view(-1, 1, 1, 1), real.flip(-1), real)
            fake = generator(torch.randn(len(real), nz, generator=rng))
            ones, zeros = torch.ones(len(real)), torch.zeros(len(real))
            opt_d.zero_grad(set_to_none=True)
            d_loss = bce(discriminator(real), ones) + bce(discriminator(fake.detach()), zeros)
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            g_loss = bce(discriminator(fake), ones)
            g_loss.backward()
            opt_g.step()
            step += 1
            history["d_loss"].append(d_loss.item())
            history["g_loss"].append(g_loss.item())
            if on_step:
                on_step(step, history["d_loss"][-1], history["g_loss"][-1])
    return generator.eval(), history


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size
