"""Many candidates through one network at once, with a parameter copy per candidate ("stacked" execution).

Attack candidates (restarts, and independent problems that share the public model) all run the same network, but
each needs its *own* simulated parameter update, so they cannot simply share a batch. ``vmap`` gets per-candidate
gradients with generic batching rules, which over convolutions and BatchNorm were measured slower than a plain loop
on CPU. Here the candidates are laid side by side in the channel dimension instead: a feature map is
``[batch, candidates * channels, H, W]``, a convolution becomes a grouped convolution with one group per candidate,
BatchNorm normalises each candidate's channels over its own batch (exactly the per-candidate statistics), and a linear
layer is a batched matrix product. Parameters are tensors ``[candidates, *shape]``, so the gradient of the summed
per-candidate losses is every candidate's own gradient, and the double backward the attack needs stays in a handful
of large kernels instead of candidates x layers small ones.

Only networks built from the layers below can be stacked (``stackable``), and their forward must treat the channel
dimension as opaque (flatten, pool, add; no reshape that splits channels); everything else takes the other paths.
fedsim's model zoo is checked against the one-at-a-time path in tests/test_attacker_parts.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# Layers that act per channel (or elementwise) need no change; these are safe to keep as they are.
CHANNELWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.Identity, nn.Flatten)


class StackedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.weight.shape[0]
        weight = self.weight.reshape(-1, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups * c)


class StackedConvTranspose2d(nn.Module):
    """A transposed convolution per candidate (generator copies): one grouped transposed convolution."""

    def __init__(self, conv: nn.ConvTranspose2d):
        super().__init__()
        self.stride, self.padding, self.output_padding = conv.stride, conv.padding, conv.output_padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.weight.shape[0]
        if self.groups == 1 and self.output_padding == (0, 0) and self.dilation == (1, 1):
            return self._matmul_fold(x, c)
        weight = self.weight.reshape(-1, *self.weight.shape[2:])  # [C * in, out / groups, k, k]
        bias = None if self.bias is None else self.bias.reshape(-1)
        return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, self.output_padding, self.groups * c,
                                  self.dilation)

    def _matmul_fold(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """The transposed convolution as a batched product with each candidate's weight and a col2im (``fold``):
        the same arithmetic as a grouped transposed convolution, measured 2-4x faster on CPU."""
        b, _, h, w = x.shape
        _, cin, cout, kh, kw = self.weight.shape
        per = x.reshape(b, c, cin, h * w).permute(1, 2, 0, 3).reshape(c, cin, b * h * w)  # [C, in, b * L]
        cols = torch.bmm(self.weight.reshape(c, cin, cout * kh * kw).transpose(1, 2), per)  # [C, out*k*k, b * L]
        cols = cols.reshape(c, cout * kh * kw, b, h * w).transpose(1, 2).reshape(c * b, cout * kh * kw, h * w)
        size = ((h - 1) * self.stride[0] - 2 * self.padding[0] + kh, (w - 1) * self.stride[1] - 2 * self.padding[1] + kw)
        out = F.fold(cols, size, (kh, kw), padding=self.padding, stride=self.stride)  # [C * b, out, H', W']
        if self.bias is not None:
            out = out + self.bias.reshape(c, 1, cout, 1, 1).expand(c, b, cout, 1, 1).reshape(c * b, cout, 1, 1)
        return out.reshape(c, b, cout, *size).transpose(0, 1).reshape(b, c * cout, *size)


class SinkHandle:
    def __init__(self, module: "StackedBatchNorm"):
        self.module = module

    def remove(self) -> None:
        self.module.sink = None


class StackedBatchNorm(nn.Module):
    """BatchNorm as the client's step uses it: each candidate's batch statistics (train mode), or the fixed running
    statistics, repeated for every candidate (eval mode)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.use_batch_stats = bn.training or bn.running_mean is None
        self.running = None if self.use_batch_stats else (bn.running_mean.detach(), bn.running_var.detach())
        self.sink: list | None = None  # set by record_batch_statistics
        self.candidates = 0

    def record_batch_statistics(self, sink: list, candidates: int) -> "SinkHandle":
        """Append (mean, biased variance) of this layer's input, each [candidates, channels], to ``sink`` on every
        forward until the returned handle is removed (a forward hook that does not compute the statistics twice)."""
        self.sink, self.candidates = sink, candidates
        return SinkHandle(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.reshape(-1)
        bias = None if self.bias is None else self.bias.reshape(-1)
        statistics = batch_statistics(x) if self.use_batch_stats or self.sink is not None else None
        if self.sink is not None:  # the BN regulariser's input statistics, shared with the normalisation
            self.sink.append((statistics[0].view(self.candidates, -1), statistics[1].view(self.candidates, -1)))
        if self.use_batch_stats:
            return batch_norm_on_batch_statistics(x, weight, bias, self.eps, statistics)
        repeats = x.shape[1] // self.running[0].numel()
        mean, var = (s.repeat(repeats) for s in self.running)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) batch mean and biased variance over all other dims, shaped to broadcast against ``x``.

    The variance is taken around the detached mean, E[(x - s)^2] - (mean - s)^2 with s = mean: var_mean's value and
    gradient at half its cost with backward. Also returns ``x - s`` and ``mean - s`` (zero in value, carrying the
    mean's gradient), which normalisation reuses."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dims, keepdim=True)
    shift = mean.detach()
    centred = x - shift
    offset = mean - shift
    var = (centred * centred).mean(dims, keepdim=True) - offset * offset
    return mean, var, centred, offset


def batch_norm_on_batch_statistics(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                   eps: float, statistics: tuple | None = None) -> torch.Tensor:
    """``F.batch_norm`` in train mode (biased batch variance) written as elementwise ops around the detached batch
    mean: the same values and derivatives, but the double backward the attack runs through it is cheaper than
    ``F.batch_norm``'s composite one (a whole ConvNet-16 step, 8 candidates: 267-290 vs 340-384 ms)."""
    _, var, centred, offset = statistics if statistics is not None else batch_statistics(x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(shape)
    shift = -offset * scale
    if bias is not None:
        shift = shift + bias.reshape(shape)
    return torch.addcmul(shift, centred, scale)


class StackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, out_features, in_features = self.weight.shape
        per = x.reshape(x.shape[0], c, in_features).transpose(0, 1)  # [C, B, in]
        y = torch.bmm(per, self.weight.transpose(1, 2))  # [C, B, out]
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.transpose(0, 1).reshape(x.shape[0], c * out_features)


def stackable(model: nn.Module) -> bool:
    """True if every leaf module is one this file can stack (so the network is correct in stacked layout)."""
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        if type(module) in (nn.Conv2d, nn.ConvTranspose2d) and module.padding_mode == "zeros":
            continue  # exactly these: a subclass may change the weight (e.g. spectral normalisation)
        if isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, *CHANNELWISE)):
            continue
        return False
    return True


def stack_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose layers take per-candidate parameters [C, *shape] (through functional_call) and
    features laid out as [batch, C * channels, ...]."""
    stacked = copy.deepcopy(model)
    for name, module in list(stacked.named_modules()):
        if type(module) is nn.Conv2d:
            replacement: nn.Module = StackedConv2d(module)
        elif type(module) is nn.ConvTranspose2d:
            replacement = StackedConvTranspose2d(module)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            replacement = StackedBatchNorm(module)
        elif isinstance(module, nn.Linear):
            replacement = StackedLinear(module)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(stacked.get_submodule(parent_name) if parent_name else stacked, child, replacement)
    return stacked


def to_stacked_layout(x: torch.Tensor) -> torch.Tensor:
    """[C, B, ch, *spatial] -> [B, C * ch, *spatial]."""
    c, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, c * x.shape[2], *x.shape[3:])


def per_candidate(h: torch.Tensor, candidates: int) -> torch.Tensor:
    """[B, C * ch, *spatial] -> [C, B, ch, *spatial]."""
    b = h.shape[0]
    return h.reshape(b, candidates, h.shape[1] // candidates, *h.shape[2:]).transpose(0, 1)
