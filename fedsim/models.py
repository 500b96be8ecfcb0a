"""Victim models of the gradient-inversion literature, built by name from a registry."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .registry import lookup, register

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    return register(MODELS, name)


class LeNetZhu(nn.Module):
    """The sigmoid LeNet of DLG (Zhu et al. 2019): three 5x5 convolutions with 12 channels and one linear layer.

    Weights and biases start uniform in [-0.5, 0.5] as in the DLG code; with this init the untrained network
    is the one the DLG/IG tables are measured on.
    """

    def __init__(self, num_classes: int = 10, channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = (image_size + 3) // 4
        self.fc = nn.Linear(12 * side * side, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(module.weight, -0.5, 0.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class ConvNet(nn.Module):
    """Geiping et al.'s ConvNet: eight conv-BN-ReLU blocks (widths w,2w,2w,4w,4w,4w | 4w,4w), two 3x3 max-pools.

    This is the layer sequence the reference code actually builds (its module dict repeats one key, so one of the
    nine listed blocks disappears); at 32x32 input the classifier sees 36*w features.
    """

    def __init__(self, num_classes: int = 10, channels: int = 3, width: int = 64, image_size: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for cin, cout in [(channels, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w)]:
            layers += _conv_bn_relu(cin, cout)
        layers.append(nn.MaxPool2d(3))
        layers += _conv_bn_relu(4 * w, 4 * w) + _conv_bn_relu(4 * w, 4 * w)
        layers.append(nn.MaxPool2d(3))
        self.features = nn.Sequential(*layers)
        side = image_size // 3 // 3
        self.fc = nn.Linear(4 * w * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool), BasicBlocks, global average pooling."""

    def __init__(self, blocks: list[int], base_width: int, num_classes: int = 10, channels: int = 3) -> None:
        # imported here: torchvision's models package pulls in torch._dynamo (~1 s in every process that imports
        # fedsim, Flower's client actors included)
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(channels, base_width, kernel_size=3, padding=1, bias=False),
                bn=nn.BatchNorm2d(base_width),
                relu=nn.ReLU(),
            )
        )
        stages: list[nn.Module] = []
        cin = base_width
        for i, count in enumerate(blocks):
            cout = base_width * 2**i
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(count):
                downsample = None
                if j == 0 and (stride != 1 or cin != cout):
                    downsample = nn.Sequential(
                        nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                    )
                stage.append(BasicBlock(cin, cout, stride=stride if j == 0 else 1, downsample=downsample))
                cin = cout
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # torchvision's BasicBlock uses in-place ReLU, which torch.func cannot differentiate twice through.
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class MLP(nn.Module):
    """A fully connected network (flatten, hidden ReLU layers, classifier): its first layer sees the raw image, so
    analytic recovery (Geiping et al. Prop. 3.1) returns a single image exactly."""

    def __init__(self, num_classes: int = 10, channels: int = 3, image_size: int = 32, width: int = 1024,
                 depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = channels * image_size * image_size
        for _ in range(depth - 1):
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoConv(nn.Module):
    """A small CNN (CI-Net's small victim): two 5x5 convolutions (64, 128 channels) with ReLU and 2x2 max-pooling,
    one linear classifier; 0.29M parameters at 32x32."""

    def __init__(self, num_classes: int = 10, channels: int = 3, image_size: int = 32, width: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


@register_model("cnn2")
def cnn2(num_classes: int, channels: int = 3, image_size: int = 32, width: int = 64, **_: object) -> nn.Module:
    return TwoConv(num_classes=num_classes, channels=channels, image_size=image_size, width=width)


@register_model("mlp")
def mlp(num_classes: int, channels: int = 3, image_size: int = 32, width: int = 1024, **_: object) -> nn.Module:
    return MLP(num_classes=num_classes, channels=channels, image_size=image_size, width=width)


@register_model("lenet_zhu")
def lenet_zhu(num_classes: int, channels: int = 3, image_size: int = 32, **_: object) -> nn.Module:
    return LeNetZhu(num_classes=num_classes, channels=channels, image_size=image_size)


@register_model("convnet")
def convnet(num_classes: int, channels: int = 3, image_size: int = 32, width: int = 64, **_: object) -> nn.Module:
    return ConvNet(num_classes=num_classes, channels=channels, width=width, image_size=image_size)


@register_model("resnet18")
def resnet18(num_classes: int, channels: int = 3, width: int = 64, **_: object) -> nn.Module:
    return CifarResNet([2, 2, 2, 2], base_width=width, num_classes=num_classes, channels=channels)


@register_model("resnet20_4")
def resnet20_4(num_classes: int, channels: int = 3, **_: object) -> nn.Module:
    return CifarResNet([3, 3, 3], base_width=16 * 4, num_classes=num_classes, channels=channels)


ACTIVATIONS = ("default", "sigmoid")


def use_sigmoid(model: nn.Module) -> nn.Module:
    """Swap every ReLU module for a Sigmoid (CI-Net's reference notebooks attack such victims: smooth activations
    make inversion easier)."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Sigmoid())
    return model


def import_object(path: str, what: str = "model"):
    """The object an import path ``"package.module:attribute"`` names; a one-line ValueError if it cannot be had."""
    from importlib import import_module

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {path!r}: expected an import path 'package.module:Name'")
    try:
        obj = import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's path: say which
        raise ValueError(f"{what} {path!r}: cannot import {module_name} ({type(err).__name__}: {err})".splitlines()[0]) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {path!r}: {attribute} is not a class or function")
    return obj


def is_import_path(name: str) -> bool:
    return ":" in name


def build_model(
    name: str,
    num_classes: int,
    *,
    image_size: int = 32,
    width: int = 64,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    activation: str = "default",
    checkpoint_key: str = "model.checkpoint",
    args: dict | None = None,
) -> nn.Module:
    """Build a registered victim with seeded init, optionally loading a checkpoint (tensors only).
    ``activation="sigmoid"`` swaps its ReLUs for Sigmoids. A ``name`` with a colon is the import path of a user's
    model class or factory, called with ``args`` alone (it knows its own classes and sizes)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {ACTIVATIONS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_import_path(name):
            model = import_object(name)(**(args or {}))
            if not isinstance(model, nn.Module):
                raise ValueError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
        else:
            model = lookup(MODELS, name, "model")(num_classes=num_classes, image_size=image_size, width=width)
    if activation == "sigmoid":
        use_sigmoid(model)
    if checkpoint:
        from .checks import load_into, load_state_dict_file

        load_into(model, load_state_dict_file(checkpoint, checkpoint_key), checkpoint, name, checkpoint_key)
    return model


def build_from_spec(spec) -> nn.Module:
    """The victim a :class:`fedsim.contract.ModelSpec` describes (the attacker's one way to rebuild the public
    model; weights are loaded afterwards)."""
    return build_model(spec.name, spec.num_classes, image_size=spec.image_shape[1], width=spec.width,
                       activation=spec.activation, args=dict(spec.args))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
