"""Optimisers (:data:`OPTIMIZERS`): signed Adam, Adam, and L-BFGS run independently per candidate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


from .simulator import Tensors

# ------------------------------------------------------------------------------------------------------------
# Optimisers: step(closure) where closure() -> (total [P, R], matching [P, R], grads {name: [P, R, ...]})


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "signed_adam"
    lr: float = 0.1
    decay_milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of the budget
    decay_gamma: float = 0.1
    max_iter: int = 20  # L-BFGS: iterations per step (one gradient evaluation each without a line search)
    history_size: int = 100  # L-BFGS memory
    # L-BFGS: "strong_wolfe" (torch.optim.LBFGS's line search, at most max_iter * 5 // 4 gradient evaluations per
    # step) or None (a fixed step of lr along each direction, as Zhu et al.'s DLG)
    line_search: str | None = None


def fused_adam(tensors) -> bool:
    """Whether torch's fused Adam kernel takes these tensors (floating point on CPU or CUDA)."""
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


class AdamOptimizer:
    """Adam (optionally on the sign of the gradient) with step decay. Adam is element-wise, so one instance over
    the stacked candidates is exactly independent optimisers per candidate."""

    def __init__(self, variables: Tensors, spec: OptimizerSpec, iterations: int, signed: bool):
        self.variables, self.signed = variables, signed
        # fused: one pass over parameter, gradient and moments; on CPU 4.7x faster than the default foreach kernels
        # for GI-w's millions of copied generator weights (57 -> 12 ms for 8 DCGAN-32 copies, one thread)
        self.opt = torch.optim.Adam(list(variables.values()), lr=spec.lr, fused=fused_adam(variables.values()))
        milestones = sorted({int(iterations * f) for f in spec.decay_milestones})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=milestones, gamma=spec.decay_gamma)
        self.evaluations = 0

    def step(self, closure):
        _, matching, grads = closure()
        self.evaluations += 1
        for key, var in self.variables.items():
            var.grad = grads[key].sign() if self.signed else grads[key]
        self.opt.step()
        self.sched.step()
        return matching


def _cubic_minimum(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                   bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic through two points with their slopes, clamped to ``bounds`` (default: between
    the points); the bounds' midpoint where the cubic has none (torch.optim.lbfgs's interpolation)."""
    low, high = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square < 0:
        return (low + high) / 2.0
    d2 = math.sqrt(d2_square)
    if x1 <= x2:
        at = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        at = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(at, low), high)


def strong_wolfe_search(t: float, f: float, gtd: float, d_norm: float, max_ls: int, c1: float = 1e-4,
                        c2: float = 0.9, tolerance_change: float = 1e-9):
    """torch.optim.LBFGS's strong-Wolfe line search for one candidate, as a coroutine: it yields each trial step
    and is sent back ``(f, gtd)`` there (loss and directional derivative), so the trial steps of many candidates are
    evaluated in one batched call. Returns ``(t, f, k)``: the accepted step, its loss and which evaluation it was
    (0-based; -1 for the starting point), whose gradient becomes the new one."""
    f_new, gtd_new = yield t
    k = 0
    t_prev, f_prev, gtd_prev, k_prev = 0.0, f, gtd, -1
    done, ls_iter = False, 0
    while ls_iter < max_ls:  # bracket a step that satisfies the Wolfe conditions
        if f_new > f + c1 * t * gtd or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_k, bracket_gtd = [t_prev, t], [f_prev, f_new], [k_prev, k], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_k, bracket_gtd = [t], [f_new], [k], [gtd_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_k, bracket_gtd = [t_prev, t], [f_prev, f_new], [k_prev, k], [gtd_prev, gtd_new]
            break
        previous = t
        t = _cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, gtd_prev, k_prev = previous, f_new, gtd_new, k
        f_new, gtd_new = yield t
        k += 1
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_k, bracket_gtd = [0.0, t], [f, f_new], [-1, k], [gtd, gtd_new]
    insufficient = False
    low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:  # zoom into the bracket
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_minimum(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:  # too close to an end: move away unless progress was made
            if insufficient or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f_new, gtd_new = yield t
        k += 1
        ls_iter += 1
        if f_new > f + c1 * t * gtd or f_new >= bracket_f[low]:
            bracket[high], bracket_f[high], bracket_k[high], bracket_gtd[high] = t, f_new, k, gtd_new
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], bracket_f[high] = bracket[low], bracket_f[low]
                bracket_k[high], bracket_gtd[high] = bracket_k[low], bracket_gtd[low]
            bracket[low], bracket_f[low], bracket_k[low], bracket_gtd[low] = t, f_new, k, gtd_new
    return bracket[low], bracket_f[low], bracket_k[low]


class BatchedLBFGS:
    """torch.optim.LBFGS's algorithm (same defaults and stopping tests, with or without its strong-Wolfe line
    search) run independently for every candidate on the flattened variables [C, D]: candidates that meet a
    stopping test stop moving. Without a line search a candidate moves ``lr`` along its direction, which diverges or
    stalls from some starts (DLG on CIFAR-10 test image 12: 3 of 3 starts failed, all converged with the line
    search, see experiments/geiping2020_table1.md)."""

    def __init__(self, variables: Tensors, spec: OptimizerSpec, iterations: int, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9):
        self.variables, self.spec = variables, spec
        self.tol_grad, self.tol_change = tolerance_grad, tolerance_change
        first = next(iter(variables.values()))
        self.C = first.shape[0] * first.shape[1]
        self.keys = list(variables)
        self.shapes = {k: v.shape for k, v in variables.items()}
        # Curvature pairs: a ring of history_size slots [slot, candidate, D], allocated at the first pair. Slot
        # head-1-k holds every candidate's k-th newest pair, so each keeps its own newest pairs as its own torch
        # optimiser would (a candidate that adds none in a round has its column rotated to stay in order).
        self.S = self.Y = self.RHO = None
        self.head = 0  # the next slot
        self.stored = 0  # slots in use (the most pairs any candidate has)
        self.dir = self.prev_grad = self.t = None
        self.h_diag = torch.ones(self.C, device=first.device)
        self.n_iter = 0
        self.evaluations = 0

    def _flat(self, tensors: Tensors) -> torch.Tensor:
        return torch.cat([tensors[k].reshape(self.C, -1) for k in self.keys], dim=1)

    def _add(self, delta: torch.Tensor) -> None:
        offset = 0
        for k in self.keys:
            n = math.prod(self.shapes[k][2:])
            self.variables[k].data += delta[:, offset:offset + n].view(self.shapes[k])
            offset += n

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        # Two-loop recursion over the pairs, newest first: slot head-1-k holds every candidate's k-th newest pair
        # (zeros, a no-op, past its own count); each pair costs a few small kernels, so fused ones (vecdot,
        # addcmul) matter here.
        q = -g
        pairs = []
        for k in range(self.stored):
            at = (self.head - 1 - k) % self.spec.history_size
            s, y, rho = self.S[at], self.Y[at], self.RHO[at]
            a = rho * torch.linalg.vecdot(s, q)
            pairs.append((s, y, rho, a))
            q = torch.addcmul(q, a[:, None], y, value=-1.0)
        r = q * self.h_diag[:, None]
        for s, y, rho, a in reversed(pairs):
            r = torch.addcmul(r, (a - rho * torch.linalg.vecdot(y, r))[:, None], s)
        return r

    def step(self, closure):
        """One torch.optim.LBFGS step per candidate. A stopping test ends the *step* for that candidate (it stops
        moving and leaves its state as torch would), not the optimisation: every step starts it afresh."""
        if self.spec.line_search == "strong_wolfe":
            return self._step_with_line_search(closure)
        if self.spec.line_search is not None:
            raise ValueError(f"unknown line search {self.spec.line_search!r}; use strong_wolfe or none")
        total, matching, grads = closure()
        self.evaluations += 1
        g = self._flat(grads)
        active = g.abs().amax(1) > self.tol_grad  # torch returns at once from an optimal point
        for inner in range(self.spec.max_iter):
            if not bool(active.any()):
                break
            d, t = self._begin_iteration(g, active)
            prev_total = total.reshape(-1)
            active = active & ((g * d).sum(1) <= -self.tol_change)  # torch breaks before moving
            move = d * torch.where(active, t, 0.0)[:, None]
            self._add(move)
            if inner == self.spec.max_iter - 1:
                break
            total, matching, grads = closure()
            self.evaluations += 1
            g = self._flat(grads)
            stop = (g.abs().amax(1) <= self.tol_grad) | (move.abs().amax(1) <= self.tol_change)
            active = active & ~stop & ((total.reshape(-1) - prev_total).abs() >= self.tol_change)
        return matching


    def _begin_iteration(self, g: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An inner iteration's direction and initial step, as torch computes them. Candidates stopped earlier in
        this step keep the state of their last move (torch's state["d"], ...), so the next step's memory pair is
        that move."""
        self.n_iter += 1
        d = -g if self.n_iter == 1 else self._memory(g, active)
        t = torch.full((self.C,), self.spec.lr, device=g.device)
        if self.n_iter == 1:
            t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.spec.lr
        keep = active[:, None]
        self.prev_grad = g.clone() if self.prev_grad is None else torch.where(keep, g, self.prev_grad)
        self.dir = d if self.dir is None else torch.where(keep, d, self.dir)
        self.t = t if self.t is None else torch.where(active, t, self.t)
        return d, t

    def _memory(self, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Add the last move's curvature pair (for the candidates it is accepted for) and return the new direction."""
        y, s = g - self.prev_grad, self.dir * self.t[:, None]
        ys = (y * s).sum(1)
        accept = active & (ys > 1e-10)
        if bool(accept.any()):
            H = self.spec.history_size
            if self.S is None:
                shape = (H, self.C, g.shape[1])  # slot-major: one slot of every candidate is contiguous
                self.S, self.Y = g.new_zeros(shape), g.new_zeros(shape)
                self.RHO = g.new_zeros(shape[:2])
            skipped = torch.nonzero(~accept).flatten()
            if len(skipped):  # keep their pairs in age order under the advancing head: rotate their columns
                for ring in (self.S, self.Y, self.RHO):
                    ring[:, skipped] = ring[:, skipped].roll(1, 0)
            rows = torch.nonzero(accept).flatten()  # the head slot holds each accepting candidate's oldest pair
            self.S[self.head, rows], self.Y[self.head, rows] = s[rows], y[rows]
            self.RHO[self.head, rows] = 1.0 / ys[rows]
            self.head = (self.head + 1) % H
            self.stored = min(self.stored + 1, H)
            self.h_diag = torch.where(accept, ys / (y * y).sum(1).clamp_min(1e-20), self.h_diag)
        return self._direction(g)

    def _flat_variables(self) -> torch.Tensor:
        return torch.cat([self.variables[k].detach().reshape(self.C, -1) for k in self.keys], dim=1)

    def _set(self, flat: torch.Tensor) -> None:
        offset = 0
        for k in self.keys:
            n = math.prod(self.shapes[k][2:])
            self.variables[k].data.copy_(flat[:, offset:offset + n].view(self.shapes[k]))
            offset += n

    def _step_with_line_search(self, closure):
        """One step of torch.optim.LBFGS with ``line_search_fn="strong_wolfe"`` per candidate: every candidate's
        search is a :func:`strong_wolfe_search` coroutine, and each round of their trial steps is one closure call
        (candidates that are not searching sit at their current point)."""
        max_eval = self.spec.max_iter * 5 // 4
        total, matching, grads = closure()
        self.evaluations += 1
        loss, g = total.reshape(-1).clone(), self._flat(grads)
        evals = torch.ones(self.C, dtype=torch.long, device=g.device)
        active = g.abs().amax(1) > self.tol_grad
        for _ in range(self.spec.max_iter):
            if not bool(active.any()):
                break
            d, t = self._begin_iteration(g, active)
            prev_loss = loss.clone()
            gtd = (g * d).sum(1)
            active = active & (gtd <= -self.tol_change)
            if not bool(active.any()):
                break
            start = self._flat_variables()
            searching = {}
            for c in torch.nonzero(active).flatten().tolist():
                # torch runs its line search at its own default tolerance (1e-9), not the optimiser's
                search = strong_wolfe_search(float(t[c]), float(loss[c]), float(gtd[c]), float(d[c].abs().max()),
                                             max_ls=int(max_eval - evals[c]))
                searching[c] = (search, next(search))
            rows: dict[int, list[torch.Tensor]] = {c: [] for c in searching}  # the gradient of each evaluation
            accepted: dict[int, tuple[float, float, int]] = {}
            while searching:
                trial = torch.zeros(self.C, device=g.device)
                for c, (_, step) in searching.items():
                    trial[c] = step
                self._set(start + trial[:, None] * d)
                total_k, _, grads_k = closure()
                self.evaluations += 1
                g_k = self._flat(grads_k)
                gtd_k = (g_k * d).sum(1).tolist()
                f_k = total_k.reshape(-1).tolist()
                for c in list(searching):
                    rows[c].append(g_k[c].clone())
                    search = searching[c][0]
                    try:
                        searching[c] = (search, search.send((f_k[c], gtd_k[c])))
                    except StopIteration as end:
                        accepted[c] = end.value
                        del searching[c]
            step = torch.zeros(self.C, device=g.device)
            for c, (t_c, f_c, k_c) in accepted.items():
                step[c] = t_c
                loss[c] = f_c
                g[c] = rows[c][k_c] if k_c >= 0 else g[c]
                evals[c] += len(rows[c])
            self._set(start + step[:, None] * d)
            self.t = torch.where(active, step, self.t)
            stop = ((g.abs().amax(1) <= self.tol_grad) | (evals >= max_eval)
                    | ((d * step[:, None]).abs().amax(1) <= self.tol_change)
                    | ((loss - prev_loss).abs() < self.tol_change))
            active = active & ~stop
        return matching


OPTIMIZERS: dict[str, Callable] = {
    "signed_adam": lambda vars_, spec, iters: AdamOptimizer(vars_, spec, iters, signed=True),
    "adam": lambda vars_, spec, iters: AdamOptimizer(vars_, spec, iters, signed=False),
    "lbfgs": lambda vars_, spec, iters: BatchedLBFGS(vars_, spec, iters),
}


