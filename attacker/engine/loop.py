"""The one optimisation loop (:class:`AttackEngine`) and how candidates are computed (stacked, vmap, loop)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import grad_and_value, vmap


from .objectives import OBJECTIVES
from .optimizers import OPTIMIZERS
from .problem import InversionProblem, JointProblem
from .regularizers import CONSENSUS, REGULARIZERS, CandidateContext
from .simulator import Tensors, VictimSimulator
from .spaces import SEARCH_SPACES, SearchSpace
from .spec import EngineResult, EngineSpec, update_fit

@dataclass
class _Part:
    """One part of a (joint) problem inside a run: its executors, targets and the view onto the variables."""

    view: dict[str, str]
    step: Callable
    score: Callable
    labels: torch.Tensor
    targets: Tensors
    aux: Tensors
    anchors: torch.Tensor

    def local(self, variables: Tensors) -> Tensors:
        """The variables under the names the space decodes for this part."""
        if not self.view:
            return variables
        return {local: variables[name] for local, name in self.view.items()}


class AttackEngine:
    VMAP_MAX_PARAMETERS = 1_000_000  # above this the victim is compute-bound and batching stops paying off
    # Without BatchNorm, stacked beats vmap up to about this many candidates (LeNet(Zhu), one thread: 14 vs 18 ms
    # per iteration at 8, 33 vs 38 at 32, tie at 64, 95 vs 82 at 100); many small groups make grouped convolutions lose.
    STACKED_MAX_CANDIDATES = 48

    def __init__(self, spec: EngineSpec, device: torch.device | str = "cpu", seed: int = 0):
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed

    def _assemble(self, problem: InversionProblem, space: SearchSpace) -> tuple[Callable, tuple[str, ...]]:
        """The per-candidate loss from a candidate's model input ``x`` and simulated update, the one place it is put
        together for every batching path: ``matching_weight * objective(update / scale, target) + sum_i w_i
        reg_i(x)``. Returns it with what the simulated update must capture for the regularisers."""
        objective = OBJECTIVES[self.spec.objective]
        regs = [(REGULARIZERS[name], weight) for name, weight in self.spec.regularizers if weight]
        sim = problem.simulator
        scale, matching_weight = self.spec.update_scale, self.spec.matching_weight

        def assemble(x, update: Tensors, captured: dict, target: Tensors, aux: Tensors, anchor: torch.Tensor,
                     variables: Tensors):
            matching = objective({k: v / scale for k, v in update.items()}, target)
            ctx = CandidateContext(sim, aux, anchor, captured.get("bn"), captured.get("features"), variables, space)
            total = matching_weight * matching
            for reg, weight in regs:
                total = total + weight * reg(x, ctx)
            return total, matching

        return assemble, self._capture_for(regs)

    def _per_candidate(self, problem: InversionProblem, space: SearchSpace, functional: bool = True) -> Callable:
        assemble, capture = self._assemble(problem, space)

        def loss(variables: Tensors, y: torch.Tensor, target: Tensors, aux: Tensors, anchor: torch.Tensor):
            x, y = space.decode(variables, y)
            update, captured = problem.simulator.update_capturing(x, y, functional, capture)
            return assemble(x, update, captured, target, aux, anchor, variables)

        return loss

    @staticmethod
    def _capture_for(regs: list) -> tuple[str, ...]:
        """What the simulated update should capture for these regularisers (saves them a forward pass)."""
        return tuple(name for name in ("bn", "features") if any(REGULARIZERS[name] is r for r, _ in regs))

    @classmethod
    def auto_batching(cls, sim: VictimSimulator, candidates: int) -> str:
        """Fastest path measured on CPU (benchmarks/README.md): one candidate or a large, compute-bound victim runs
        plain autograd; small stackable victims run stacked (1.4-2.8x faster than the loop on ConvNet-8/16, 1.3-1.5x
        faster than vmap on LeNet(Zhu) at 8 restarts), except BatchNorm-free ones with very many candidates, where
        vmap wins; other small victims run vmap without BatchNorm (vmap over BatchNorm was slower than the loop)."""
        if candidates == 1 or sim.num_parameters > cls.VMAP_MAX_PARAMETERS:
            return "loop"
        if sim.stackable and (sim.bn_layers or candidates <= cls.STACKED_MAX_CANDIDATES):
            return "stacked"
        return "loop" if sim.bn_layers else "vmap"

    def default_space(self, problem: InversionProblem) -> SearchSpace:
        return SEARCH_SPACES[self.spec.search_space](problem, init=self.spec.init, boxed=self.spec.boxed)

    def _executors(self, problem: InversionProblem, candidates: int,
                   space: SearchSpace | None = None) -> tuple[Callable, Callable]:
        """(step, score) over stacked candidates: step(vars, labels, targets, aux, anchors) returns
        (totals [P, R], matching [P, R], grads); score returns matching."""
        space = (space or self.default_space(problem)).to(self.device)
        batching = self.spec.batching
        if batching == "auto":
            # torch.compile is wired to the vmap step (torch.func composes with it; the stacked step's nested
            # autograd.grad does not compile into one graph), so compile = true runs vmap.
            batching = "vmap" if self.spec.compile else self.auto_batching(problem.simulator, candidates)
        if batching == "stacked":
            if not problem.simulator.stackable:
                raise ValueError("batching 'stacked' needs a victim built from Conv2d, BatchNorm, Linear and "
                                 "channel-wise layers; use auto, vmap or loop")
            return self._stacked_executors(problem, space)
        if batching == "vmap":
            per = self._per_candidate(problem, space, functional=True)
            inner = (0, None, None, None, 0)  # over restarts: variables and anchors vary
            outer = (0, 0, 0, 0, 0)  # over problems: everything varies
            batched = vmap(vmap(grad_and_value(per, has_aux=True), in_dims=inner), in_dims=outer)
            if self.spec.compile:
                batched = torch.compile(batched)
            scorer = vmap(vmap(per, in_dims=inner), in_dims=outer)

            def step(variables, labels, targets, aux, anchors):
                grads, (totals, matching) = batched(variables, labels, targets, aux, anchors)
                return totals, matching, grads

            def score(variables, labels, targets, aux, anchors):
                with torch.no_grad():
                    return scorer(variables, labels, targets, aux, anchors)[1]

            return step, score

        per = self._per_candidate(problem, space, functional=False)

        def each(variables, labels, targets, aux, anchors, with_grad: bool):
            first = next(iter(variables.values()))
            P, R = first.shape[:2]
            # all filled below; one candidate's gradients are taken as they are
            grads = ({k: torch.empty_like(v) for k, v in variables.items()} if P * R > 1 else {}) if with_grad else None
            totals = torch.empty(P, R, device=first.device)
            matching = torch.empty(P, R, device=first.device)
            for p in range(P):
                target = {k: v[p] for k, v in targets.items()}
                aux_p = {k: v[p] for k, v in aux.items()}
                for r in range(R):
                    cand = {k: v[p, r].detach().requires_grad_(True) for k, v in variables.items()}
                    with torch.enable_grad():
                        total, match = per(cand, labels[p], target, aux_p, anchors[p, r])
                        if with_grad:
                            g = torch.autograd.grad(total, list(cand.values()))
                            for k, gk in zip(cand, g):
                                if P * R == 1:  # a view, not a copy of (possibly millions of) generator weights
                                    grads[k] = gk[None, None]
                                else:
                                    grads[k][p, r] = gk
                    totals[p, r], matching[p, r] = total.detach(), match.detach()
            return totals, matching, grads

        return (lambda *a: each(*a, with_grad=True), lambda *a: each(*a, with_grad=False)[1])

    def _stacked_executors(self, problem: InversionProblem, space: SearchSpace) -> tuple[Callable, Callable]:
        """All candidates through the stacked network (attacker/stacked.py): one forward and double backward per
        local step for every candidate; the per-candidate loss is vmapped over them (cheap, elementwise)."""
        assemble, capture = self._assemble(problem, space)
        batched = vmap(assemble)

        def evaluate(variables, labels, targets, aux, anchors, with_grad: bool):
            first = next(iter(variables.values()))
            P, R = first.shape[:2]
            flat = {k: v.reshape(P * R, *v.shape[2:]).detach().requires_grad_(with_grad) for k, v in variables.items()}

            def spread(t):  # per problem [P, ...] -> per candidate [P * R, ...]
                return t[:, None].expand(P, R, *t.shape[1:]).reshape(P * R, *t.shape[1:])

            with torch.enable_grad():
                x, y = space.decode_many(flat, spread(labels))
                update, captured = problem.simulator.stacked_update(x, y, capture)
                total, matching = batched(x, update, captured, {k: spread(v) for k, v in targets.items()},
                                          {k: spread(v) for k, v in aux.items()},
                                          anchors.reshape(P * R, *anchors.shape[2:]), flat)
                grads = None
                if with_grad:
                    values = torch.autograd.grad(total.sum(), list(flat.values()))
                    grads = {k: g.view(P, R, *g.shape[1:]) for k, g in zip(flat, values)}
            return total.detach().view(P, R), matching.detach().view(P, R), grads

        return (lambda *a: evaluate(*a, with_grad=True), lambda *a: evaluate(*a, with_grad=False)[1])

    def run(self, problem: InversionProblem | JointProblem, space: SearchSpace | None = None,
            start: Tensors | None = None) -> EngineResult:
        """Search ``space`` (default: the one ``spec.search_space`` names) for inputs whose simulated update matches
        ``problem``'s targets. ``start``: initial variables (each [P, R, ...]) instead of the space's init, so a
        multi-stage attack continues from an earlier run's result."""
        spec, dev = self.spec, self.device
        joint = problem if isinstance(problem, JointProblem) else JointProblem([problem], [{}])
        lead = joint.parts[0]
        P, R = lead.num_problems, spec.restarts
        space = (space or self.default_space(lead)).to(dev)
        seeds = lead.seeds if lead.seeds is not None else [
            int(np.random.SeedSequence([self.seed, p]).generate_state(1)[0]) for p in range(P)]
        if len(seeds) != P:
            raise ValueError(f"{len(seeds)} seeds for {P} problems")
        initial = start if start is not None else space.init_each(seeds, R)
        variables = {k: v.detach().clone().to(dev).requires_grad_(True) for k, v in initial.items()}

        parts = []
        for part, view in zip(joint.parts, joint.views):
            step_fn, score_fn = self._executors(part, P * R, space)
            parts.append(_Part(view, step_fn, score_fn, part.labels.to(dev),
                               {k: v.to(dev) / spec.update_scale for k, v in part.targets.items()},
                               {k: v.to(dev) for k, v in part.aux.items()} or {"_": torch.zeros(P, device=dev)},
                               torch.zeros(P, R, part.batch_size, *part.image_shape, device=dev)))
        fixed = {view.get(k, k) for view in joint.views for k in space.fixed}
        searched = {k: v for k, v in variables.items() if k not in fixed}
        optimizer = OPTIMIZERS[spec.optimizer.name](searched, spec.optimizer, spec.iterations)

        def closure():
            detached = {k: v.detach() for k, v in variables.items()}
            totals = matching = 0.0
            grads: Tensors = {}
            for part in parts:
                total, match, local_grads = part.step(part.local(detached), part.labels, part.targets, part.aux,
                                                      part.anchors)
                totals, matching = totals + total, matching + match
                for k, g in local_grads.items():
                    key = part.view.get(k, k)
                    grads[key] = grads[key] + g if key in grads else g
            return totals, matching, grads

        trace: list[tuple[int, torch.Tensor]] = []
        t0 = time.perf_counter()
        for it in range(spec.iterations):
            if spec.group is not None and it >= spec.group.start and (it - spec.group.start) % spec.group.every == 0:
                with torch.no_grad():
                    for part in parts:
                        part.anchors = CONSENSUS[spec.group.mode](space.inputs(part.local(variables), part.labels))
            matching = optimizer.step(closure)
            with torch.no_grad():
                space.project_(variables)
            if spec.trace_every and (it + 1) % spec.trace_every == 0:
                trace.append((it + 1, matching.detach().clone()))

        # Score the final candidates (the loop's losses lag one step behind the last update).
        final = {k: v.detach() for k, v in variables.items()}
        matching = sum(part.score(part.local(final), part.labels, part.targets, part.aux, part.anchors)
                       for part in parts)
        seconds = time.perf_counter() - t0
        scores = torch.where(torch.isfinite(matching), matching, torch.full_like(matching, math.inf))
        chosen = scores.argmin(dim=1)
        rows = torch.arange(P, device=dev)
        first, labels, targets = parts[0].local(final), parts[0].labels, parts[0].targets
        with torch.no_grad():
            all_images = space.unit_images(first, labels)
        out_labels = space.labels_out(first, labels)[rows, chosen]
        trace_rows = [(it, torch.nan_to_num(m, nan=math.inf).min(dim=1).values.cpu().tolist()) for it, m in trace]
        fits: dict[str, list[float]] = {}
        for p in range(P):
            chosen_vars = {k: v[p, chosen[p]] for k, v in first.items()}
            with torch.enable_grad():
                x, y = space.decode(chosen_vars, labels[p])
                sim_update = {k: v.detach() / spec.update_scale
                              for k, v in lead.simulator.update(x, y, functional=False).items()}
            for key, value in update_fit(sim_update, {k: v[p] for k, v in targets.items()}).items():
                fits.setdefault(key, []).append(value)
        return EngineResult(images=all_images[rows, chosen].cpu(), labels=out_labels.cpu(),
                            losses=scores[rows, chosen].cpu(), chosen_restart=chosen.cpu(), trace=trace_rows,
                            seconds=seconds, iterations=spec.iterations, evaluations=optimizer.evaluations,
                            all_images=all_images.cpu(), update_fit={k: torch.tensor(v) for k, v in fits.items()},
                            variables=final)
