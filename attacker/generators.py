"""Generative image priors: registered ``nn.Module``s mapping latents ``[N, *latent_shape]`` to images in [-1, 1].

A generator is named by a registry key (``dcgan``, ``cinet``; outside packages add theirs through the
``fedsim.generators`` entry-point group) or by an import path ``package.module:Factory`` (a class or function taking
``image_size``, ``channels`` and its own keyword parameters). Every generator exposes ``latent_shape``.

A prior checkpoint (``fedsim prior train``) holds tensors and plain values only, so it loads with
``weights_only=True``: ``{"generator": name, "params": {...}, "image_size": int, "channels": int,
"state_dict": {...}}``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
from torch import nn

from fedsim.registry import PluginRegistry, lookup, register

GENERATORS = PluginRegistry("fedsim.generators", "generator")


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.'s initialisation: convolutions N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN (Radford et al. 2016) for square images of 2^k pixels: a transposed convolution from the latent to 4x4
    with ``ngf * 2^(k-3)`` channels, then transposed convolutions halving the channels and doubling the side
    (BatchNorm + ReLU), and one to RGB with tanh. At 32x32 with nz 100, ngf 64: 1.07M parameters."""

    def __init__(self, image_size: int = 32, channels: int = 3, nz: int = 100, ngf: int = 64) -> None:
        super().__init__()
        stages = int(math.log2(image_size)) - 2  # 4 -> image_size
        if 2 ** (stages + 2) != image_size or stages < 1:
            raise ValueError(f"dcgan needs a power-of-two image size >= 8, not {image_size}")
        self.latent_shape = (nz,)
        width = ngf * 2 ** (stages - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU()]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(nn.Module):
    """The matching discriminator (for ``fedsim prior train``): strided convolutions with LeakyReLU(0.2), BatchNorm
    after the first, down to one logit."""

    def __init__(self, image_size: int = 32, channels: int = 3, ndf: int = 64) -> None:
        super().__init__()
        stages = int(math.log2(image_size)) - 2
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        width = ndf
        for _ in range(stages - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


@register(GENERATORS, "dcgan")
def dcgan(image_size: int = 32, channels: int = 3, nz: int = 100, ngf: int = 64) -> nn.Module:
    return DCGANGenerator(image_size, channels, nz, ngf)


def _factory(name: str):
    if ":" in name:  # a user's module by import path
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"generator {name!r} cannot be imported: {err}") from None
    return lookup(GENERATORS, name, "generator")


def build_generator(name: str, image_size: int, channels: int = 3, seed: int | None = None, **params) -> nn.Module:
    """A generator for ``image_size`` x ``image_size`` images, checked to map its latents to that shape."""
    factory = _factory(name)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            module = factory(image_size=image_size, channels=channels, **params)
        except TypeError as err:
            raise ValueError(f"generator {name!r}: {err}") from None
    if not isinstance(module, nn.Module) or not hasattr(module, "latent_shape"):
        raise ValueError(f"generator {name!r} must be an nn.Module with a latent_shape attribute")
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, *module.latent_shape))
    if tuple(out.shape[1:]) != (channels, image_size, image_size):
        raise ValueError(f"generator {name!r} makes images of shape {tuple(out.shape[1:])}, not "
                         f"{(channels, image_size, image_size)}")
    return module


def save_prior(path: Path, name: str, params: dict, image_size: int, channels: int, module: nn.Module,
               **info) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"generator": name, "params": dict(params), "image_size": image_size, "channels": channels,
               "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}, **info}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_prior(path: str | Path, image_size: int | None = None, channels: int | None = None) -> tuple[nn.Module, dict]:
    """The generator saved at ``path`` (weights only) and its metadata; checked against the victim's image shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prior checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or unsafe file: one line
        raise ValueError(f"prior checkpoint {path} cannot be loaded with weights_only=True: {err}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "generator" not in payload:
        raise ValueError(f"prior checkpoint {path} is not a fedsim prior (no generator / state_dict)")
    size, chans = int(payload["image_size"]), int(payload["channels"])
    if (image_size is not None and size != image_size) or (channels is not None and chans != channels):
        raise ValueError(f"prior {path} makes {chans}x{size}x{size} images; the victim takes "
                         f"{channels}x{image_size}x{image_size}")
    module = build_generator(payload["generator"], size, chans, **payload.get("params", {}))
    module.load_state_dict(payload["state_dict"])
    return module.eval(), {k: v for k, v in payload.items() if k != "state_dict"}


# ------------------------------------------------------------------------------------------------------------
# CI-Net (Zhang et al., ICCV 2023): an over-parameterised generator built per attack


class SpectralConv2d(nn.Conv2d):
    """A 3x3 convolution whose weight is divided by its exact spectral norm (largest singular value of the weight
    as a matrix) at every forward. The reference uses torch's power-iteration estimate with a persistent vector
    (one step per forward); the exact norm is what that estimate converges to, and it keeps the module functional
    (no in-place buffer updates), so copies of it can be vmapped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.linalg.matrix_norm(self.weight.flatten(1), ord=2)
        return self._conv_forward(x, self.weight / sigma, self.bias)


def _ci_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(SpectralConv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
                         SpectralConv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1))


class CINetGenerator(nn.Module):
    """CI-Net's generator: a transposed convolution from the code (128) to 4x4, then blocks of two spectrally
    normalised 3x3 convolutions with BatchNorm and LeakyReLU(0.1) at 4x4 and after every nearest-neighbour x2
    upsampling, width ``width`` up to 32x32 (halved at 64, quartered from 128), a 1x1 to-RGB and tanh."""

    def __init__(self, image_size: int = 32, channels: int = 3, nz: int = 128, width: int = 256) -> None:
        super().__init__()
        if image_size < 32 or image_size & (image_size - 1):
            raise ValueError(f"cinet needs a power-of-two image size >= 32, not {image_size}")
        self.latent_shape = (nz,)
        self.input = nn.Sequential(nn.ConvTranspose2d(nz, width, 4, 1, 0), nn.BatchNorm2d(width), nn.LeakyReLU(0.1))
        widths = {4: width, 8: width, 16: width, 32: width, 64: width // 2, 128: width // 4, 256: width // 4}
        blocks, cin, side = [_ci_block(width, width)], width, 4
        while side < image_size:
            side *= 2
            cout = widths.get(side, width // 4)
            blocks.append(_ci_block(cin, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = nn.Conv2d(cin, channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0](self.input(z.reshape(z.shape[0], -1, 1, 1)))
        for block in self.blocks[1:]:
            out = block(nn.functional.interpolate(out, scale_factor=2, mode="nearest"))
        return torch.tanh(self.to_rgb(out))


@register(GENERATORS, "cinet")
def cinet(image_size: int = 32, channels: int = 3, nz: int = 128, width: int = 256) -> nn.Module:
    return CINetGenerator(image_size, channels, nz, width)


def cinet_width(batch_size: int, image_size: int, channels: int = 3, factor: float = 4.0, start: int = 32,
                nz: int = 128) -> int:
    """CI-Net's over-parameterisation rule: double the width from ``start`` while the generator has at most
    ``factor x batch x H x W`` parameters, so the chosen generator is the first with more."""
    bound = factor * batch_size * image_size * image_size
    width = start
    while sum(p.numel() for p in CINetGenerator(image_size, channels, nz, width).parameters()) <= bound:
        width *= 2
    return width
