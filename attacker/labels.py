"""Label recovery from the last fully connected layer of an observed update (analytic, no optimisation).

For softmax cross-entropy, the gradient of the logit bias is ``p - y`` per sample and the weight gradient row of
class ``c`` is ``sum_n (p_nc - y_nc) h_n``. Rows of the classes present carry the negative ``-y`` mass. A weight
*update* is ``-lr * gradient``, so its sign is flipped back first.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from fedsim.registry import lookup, register

LabelMethod = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]
LABEL_METHODS: dict[str, LabelMethod] = {}


def register_label_method(name: str) -> Callable[[LabelMethod], LabelMethod]:
    return register(LABEL_METHODS, name)


@register_label_method("idlg")
def idlg(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, num_images: int) -> torch.Tensor:
    """iDLG (Zhao et al. 2020), one image: the only class whose weight-gradient row sums negative."""
    if num_images != 1:
        raise ValueError(f"idlg recovers the label of one image, not {num_images}")
    return weight_grad.sum(dim=1).argmin().view(1)


@register_label_method("yin")
def yin(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, num_images: int) -> torch.Tensor:
    """Yin et al. 2021 (GradInversion), distinct labels: the ``num_images`` rows with the smallest minima."""
    row_min = weight_grad.min(dim=1).values
    k = min(num_images, weight_grad.shape[0])
    chosen = row_min.topk(k, largest=False).indices
    if k < num_images:  # more images than classes: repeat the strongest candidates
        chosen = chosen.repeat(-(-num_images // k))[:num_images]
    return chosen.sort().values


@register_label_method("auto")
def auto(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, num_images: int) -> torch.Tensor:
    """iDLG for a single image, Yin's row minima for a batch."""
    return (idlg if num_images == 1 else yin)(weight_grad, bias_grad, num_images)


def last_linear(update: dict[str, np.ndarray], num_classes: int) -> tuple[str, str | None]:
    """Names of the classifier's weight and bias: the last 2-D array with ``num_classes`` rows."""
    keys = list(update)
    for key in reversed(keys):
        if update[key].ndim == 2 and update[key].shape[0] == num_classes:
            bias = key[: -len("weight")] + "bias" if key.endswith("weight") else None
            return key, bias if bias in update else None
    raise ValueError("the update has no fully connected layer with one row per class")


def recover_labels(update: dict[str, np.ndarray], num_classes: int, num_images: int, method: str = "auto") -> np.ndarray:
    """Recover ``num_images`` labels from a parameter update (new minus old weights) with a registered method."""
    lookup(LABEL_METHODS, method, "label method")
    w_key, b_key = last_linear(update, num_classes)
    weight_grad = -torch.as_tensor(update[w_key], dtype=torch.float64)
    bias_grad = -torch.as_tensor(update[b_key], dtype=torch.float64) if b_key else None
    return LABEL_METHODS[method](weight_grad, bias_grad, num_images).numpy().astype(np.int64)
