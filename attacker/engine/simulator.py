"""The simulated client update: the client's local SGD steps replayed, differentiable in the candidate inputs."""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from fedsim.training import set_bn_mode

from ..stacked import (StackedBatchNorm, batch_statistics, per_candidate, stack_model, stackable,
                      to_stacked_layout)

Tensors = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------------------
# Simulated update


class VictimSimulator:
    """A functional copy of the public model that replays the client's local steps.

    BatchNorm follows the client's ``bn_mode``: with batch statistics ("train"; running statistics are dropped, they
    would be in-place state that ``vmap`` cannot batch and they do not enter the parameter update) or with the
    public model's fixed running statistics ("eval").
    """

    def __init__(self, model: nn.Module, schedule: list[np.ndarray], lr: float, device: torch.device | str = "cpu",
                 bn_mode: str = "train"):
        self.model = copy.deepcopy(model).to(device)
        self.bn_mode = bn_mode
        if bn_mode == "train":
            replace_all_batch_norm_modules_(self.model)
        set_bn_mode(self.model, bn_mode)
        self.params: Tensors = {k: v.detach() for k, v in self.model.named_parameters()}
        # Leaves for the plain-autograd path (one candidate at a time), where torch.func's wrappers only cost time.
        self.leaf_params: Tensors = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        self.buffers: Tensors = {k: v.detach() for k, v in self.model.named_buffers()}
        self.schedule = [torch.as_tensor(np.asarray(s, dtype=np.int64), device=device) for s in schedule]
        self.lr = lr
        self.bn_layers = [name for name, m in self.model.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        linears = [name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        self.feature_layer = linears[-1] if linears else None  # the classifier, whose input analytic recovery gives
        self._stacked: nn.Module | None = None  # built on first use, see attacker/stacked.py

    @property
    def stackable(self) -> bool:
        return stackable(self.model)

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.params.values())

    def loss(self, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, (params, self.buffers), (x,))
        if y.is_floating_point():  # soft labels (probabilities)
            return -(y * logits.log_softmax(-1)).sum(-1).mean()
        return nn.functional.cross_entropy(logits, y)

    def _grads(self, params: Tensors, x: torch.Tensor, y: torch.Tensor, functional: bool) -> Tensors:
        if functional:  # composable with vmap
            return torch.func.grad(self.loss)(params, x, y)
        names = list(params)
        grads = torch.autograd.grad(self.loss(params, x, y), [params[k] for k in names], create_graph=True)
        return dict(zip(names, grads))

    def update(self, x: torch.Tensor, y: torch.Tensor, functional: bool = True) -> Tensors:
        """Parameter update (new minus old) after the client's SGD steps on candidate batch ``x``.

        ``functional=True`` uses torch.func (needed under vmap); ``False`` plain autograd, same arithmetic."""
        return self.update_capturing(x, y, functional)[0]

    def update_capturing(self, x: torch.Tensor, y: torch.Tensor, functional: bool = True,
                         capture: tuple[str, ...] = ()) -> tuple[Tensors, dict]:
        """``update`` plus what the regularisers read from the first step's forward (``capture``: ``"bn"``, the
        BatchNorm input statistics; ``"features"``, the classifier input), taken from that same forward pass
        instead of an extra one."""
        return self._replay(self.params if functional else self.leaf_params,
                            lambda positions: (x[positions], y[positions]),
                            lambda params, xb, yb: self._grads(params, xb, yb, functional),
                            lambda captured: self._capture(self.model, captured, capture))

    def stacked_update(self, x: torch.Tensor, y: torch.Tensor, capture: tuple[str, ...] = ()) -> tuple[Tensors, dict]:
        """Updates of C candidates at once (``x`` [C, B, ...], ``y`` [C, B] or soft [C, B, K]), each [C, *shape],
        through the stacked network (attacker/stacked.py). ``capture`` may ask for the first step's BatchNorm input
        statistics (``"bn"``: list of (mean, var), each [C, channels]) and classifier input (``"features"``:
        [C, B, in]), which the regularisers need and which would otherwise cost extra forward passes."""
        if self._stacked is None:
            self._stacked = stack_model(self.model)
        count = x.shape[0]

        def grads(params, xb, yb):
            values = torch.autograd.grad(self._stacked_loss(params, xb, yb), list(params.values()), create_graph=True)
            return dict(zip(params, values))

        return self._replay({k: v.expand(count, *v.shape) for k, v in self.leaf_params.items()},
                            lambda positions: (x[:, positions], y[:, positions]), grads,
                            lambda captured: self._capture(self._stacked, captured, capture, count))

    def _replay(self, start: Tensors, batch: Callable, grads_of: Callable, hooks: Callable) -> tuple[Tensors, dict]:
        """The client's local SGD steps from ``start`` (the one replay every batching path uses): ``batch(positions)``
        gives a step's inputs and labels, ``grads_of(params, x, y)`` their gradients, ``hooks(captured)`` installs the
        first step's capture (removed after it). Returns the update (new minus start) and what was captured."""
        params, captured = start, {}
        for step, positions in enumerate(self.schedule):
            handles = hooks(captured) if step == 0 else []
            try:
                grads = grads_of(params, *batch(positions))
            finally:
                for handle in handles:
                    handle.remove()
            params = {k: params[k] - self.lr * grads[k] for k in params}
        return {k: params[k] - start[k] for k in params}, captured

    def _stacked_loss(self, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count, batch = x.shape[:2]
        logits = functional_call(self._stacked, params, (to_stacked_layout(x),))
        logits = logits.reshape(batch, count, -1).transpose(0, 1)  # [C, B, K]
        if y.is_floating_point():
            per = -(y * logits.log_softmax(-1)).sum(-1).mean(1)
        else:
            per = nn.functional.cross_entropy(logits.reshape(count * batch, -1), y.reshape(-1),
                                              reduction="none").view(count, batch).mean(1)
        return per.sum()  # candidates are independent: the gradient of the sum is each one's own gradient

    def _capture(self, network: nn.Module, captured: dict, what: tuple[str, ...], count: int = 0) -> list:
        """Hooks on ``network`` that store BatchNorm input statistics (``"bn"``: list of (mean, var) per
        layer, each [channels], or [count, channels] for the stacked network of ``count`` candidates) and the
        classifier input (``"features"``) into ``captured``. The caller removes the returned handles."""
        handles = []
        if "bn" in what:
            captured["bn"] = []

            def bn_hook(_module, inputs):  # per (stacked) channel over batch and space
                mean, var = batch_statistics(inputs[0])[:2]
                shape = (count, -1) if count else (-1,)
                captured["bn"].append((mean.view(shape), var.view(shape)))

            for name in self.bn_layers:
                layer = network.get_submodule(name)
                if isinstance(layer, StackedBatchNorm):  # computes the statistics anyway: shares them
                    handles.append(layer.record_batch_statistics(captured["bn"], count))
                else:
                    handles.append(layer.register_forward_pre_hook(bn_hook))
        if "features" in what and self.feature_layer is not None:
            def feature_hook(_module, inputs):
                captured["features"] = per_candidate(inputs[0], count) if count else inputs[0]

            handles.append(network.get_submodule(self.feature_layer).register_forward_pre_hook(feature_hook))
        return handles

    def _first_step_forward(self, x: torch.Tensor, what: tuple[str, ...]) -> dict:
        captured: dict = {}
        handles = self._capture(self.model, captured, what)
        try:
            functional_call(self.model, (self.params, self.buffers), (x[self.schedule[0]],))
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def bn_statistics(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batch mean and biased variance at every BatchNorm input for the client's first step on ``x``."""
        return self._first_step_forward(x, ("bn",))["bn"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the classifier (``feature_layer``) for the first-step batch."""
        return self._first_step_forward(x, ("features",))["features"]


