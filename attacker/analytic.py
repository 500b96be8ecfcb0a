"""Analytic recovery (Geiping et al. 2020, Prop. 3.1): the input of a fully connected layer with a bias.

For one sample, ``dL/dW = (dL/db) x^T``: every row of the weight gradient is the input scaled by that row's bias
gradient, so ``x = dW^T db / ||db||^2`` (least squares over all rows, exact up to rounding). An update of plain SGD
steps is ``-lr`` times gradients; the ratio is unchanged, so updates work directly (FedSGD exactly; several local
steps only approximately). For a batch the same formula returns the ``db``-weighted mixture of the inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def linear_input(weight_update: torch.Tensor, bias_update: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """The input (in_features,) of a linear layer from its weight (out, in) and bias (out,) updates or gradients."""
    w, b = weight_update.double(), bias_update.double()
    norm = (b * b).sum()
    if float(norm) <= eps:
        return torch.full((w.shape[1],), float("nan"), dtype=torch.float64)
    return (b @ w) / norm


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the model's Linear modules that have a bias, in forward order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]


def first_layer_is_linear(model: nn.Module) -> bool:
    """True if the first parameterised layer is Linear (possibly after Flatten): then its input is the image."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            return False
        if isinstance(module, nn.Linear):
            return True
    return False


def recover_layer_input(update: dict[str, np.ndarray], layer: str) -> torch.Tensor:
    return linear_input(torch.as_tensor(update[f"{layer}.weight"]), torch.as_tensor(update[f"{layer}.bias"]))
