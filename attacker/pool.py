"""The attacker worker pool: observed updates go in asynchronously, leakage rows come out through the evaluator.

``ray`` executor: stateful Ray actors that request **no CPUs** (Flower counts every CPU for its client actors; an
attacker holding one can starve a client message and hang the run). A client always goes to the same worker, so
cross-round state (priors, per-client history) lives in one place. A collector thread hands finished results to
the evaluator as they complete; :meth:`AttackerPool.drain` waits for all of them before the run may end.
``inline`` executor: the attack runs in the caller's thread (the FL loop waits), for runs without Ray and for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from .attacks import Attack, build_attack, label_candidates
from .records import ObservedUpdate, Reconstruction, ThreatModel

Outcome = Reconstruction | BaseException
RecordFn = Callable[[ObservedUpdate, str, Outcome], object]


class AttackWorker:
    """Runs every configured attack on a batch of observed updates (the updates are inverted together)."""

    def __init__(self, attack_specs: list[dict], threat: ThreatModel, device: str = "cpu", threads: int = 1,
                 seed: int = 0) -> None:
        torch.set_num_threads(threads)
        self.attacks: list[Attack] = [build_attack(spec) for spec in attack_specs]
        self.threat, self.device, self.seed = threat, device, seed

    def run(self, observed: list[ObservedUpdate]) -> list[tuple[int, str, Outcome]]:
        """(index into ``observed``, attack name, reconstruction or the exception it raised)."""
        out: list[tuple[int, str, Outcome]] = []
        candidates = [label_candidates(obs, self.threat) for obs in observed]
        for attack in self.attacks:
            seed = self.seed + 1000 * observed[0].round
            try:
                recs = attack.reconstruct_many(observed, self.threat, device=self.device, seed=seed)
                for i, rec in enumerate(recs):
                    rec.extra.setdefault("label_candidates", candidates[i])
                out += [(i, attack.name, rec) for i, rec in enumerate(recs)]
            except Exception as err:  # noqa: BLE001 - a failing attack becomes error rows, the others still run
                out += [(i, attack.name, err) for i in range(len(observed))]
        return out


class AttackerPool:
    def __init__(self, attack_specs: list[dict], threat: ThreatModel, record: RecordFn, *, executor: str = "ray",
                 workers: int = 2, threads: int = 1, device: str = "cpu", seed: int = 0,
                 gpus_per_worker: float | None = None, on_submit: Callable[[int], None] | None = None) -> None:
        self.record = record
        self.executor = executor
        self.on_submit = on_submit
        self._errors: list[BaseException] = []
        if executor == "inline":
            self._inline = AttackWorker(attack_specs, threat, device, threads, seed)
            return
        if executor != "ray":
            raise ValueError(f"unknown executor {executor!r}; use ray or inline")
        import ray

        if not ray.is_initialized():
            raise RuntimeError("the ray executor needs Ray initialised first")
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 / workers if device.startswith("cuda") else 0.0
        remote = ray.remote(num_cpus=0, num_gpus=gpus_per_worker)(AttackWorker)
        self._actors = [remote.remote(attack_specs, threat, device, threads, seed) for _ in range(workers)]
        self._pending: dict = {}  # ObjectRef -> observed list
        self._cv = threading.Condition()
        self._closed = False
        self._collector = threading.Thread(target=self._collect, name="attacker-collector", daemon=True)
        self._collector.start()

    # -- submission -------------------------------------------------------------------------------------------
    def submit(self, observed: list[ObservedUpdate]) -> None:
        if not observed:
            return
        if self.on_submit:
            self.on_submit(len(observed))
        if self.executor == "inline":
            self._deliver(observed, self._inline.run(observed))
            return
        by_worker: dict[int, list[ObservedUpdate]] = {}
        for obs in observed:
            by_worker.setdefault(obs.client_id % len(self._actors), []).append(obs)
        with self._cv:
            for worker, batch in by_worker.items():
                self._pending[self._actors[worker].run.remote(batch)] = batch
            self._cv.notify_all()

    def _deliver(self, observed: list[ObservedUpdate], results: list[tuple[int, str, Outcome]]) -> None:
        for index, attack, outcome in results:
            try:
                self.record(observed[index], attack, outcome)
            except BaseException as err:  # noqa: BLE001 - keep collecting; re-raised in drain()
                self._errors.append(err)

    # -- collection -------------------------------------------------------------------------------------------
    def _collect(self) -> None:
        import ray

        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending and self._closed:
                    return
                refs = list(self._pending)
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                with self._cv:
                    batch = self._pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a dead actor: every update of the batch gets an error row
                    results = [(i, "worker", err) for i in range(len(batch))]
                self._deliver(batch, results)
                with self._cv:
                    self._cv.notify_all()

    def drain(self, timeout: float | None = None) -> None:
        """Block until every submitted attack has been recorded."""
        if self.executor == "inline":
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{len(self._pending)} attack batches still running after {timeout} s")
                self._cv.wait(timeout=remaining if remaining is not None else 1.0)
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        if self.executor == "inline":
            return
        self.drain()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._collector.join(timeout=5)
