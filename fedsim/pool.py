"""The attacker worker pool: observed updates go in asynchronously, leakage rows come out through the evaluator.

It runs any attack registered in :data:`fedsim.contract.ATTACKS` (the attacker plugin's or an outside package's).

Owners. Every (attack, update) pair goes to one worker, its owner: a per-client history (``state_scope =
"client"``) is owned by ``client_id % workers``, a global state (``"global"``, e.g. a GIML prior) by one fixed
worker, so such state is never split; a stateless attack by one worker per attack when there are at least as many
attacks as workers (a round's updates stay one batched inversion), else by ``client_id % workers``. Ray runs an actor's tasks in submission order, so an owner sees
round r before round r + 1.

State. After running a round's updates the owner calls ``end_round`` and saves each stateful attack's
``state_dict()`` to ``<state_dir>/<attack>/round_NNN.pt`` (``<attack>/worker_K/`` for client-scoped state); a worker
starting up (a new run with ``--resume``, or Ray restarting a dead actor) loads the newest file with
``weights_only=True``.

Executors. ``ray``: stateful Ray actors that request **no CPUs** (Flower counts every CPU for its client actors; an
attacker holding one can starve a client message and hang the run); a collector thread hands finished results to
the evaluator as they complete and :meth:`AttackerPool.drain` waits for all of them. ``inline``: the attack runs in
the caller's thread (the FL loop waits), for runs without Ray and for tests.

Seeds. Workers get the attacker's root seed (fedsim.seeds), never the run seed the clients draw from.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .contract import ATTACKS, Attack, ObservedUpdate, Reconstruction, ThreatModel, build_attack
from .registry import lookup
from .seeds import attack_seed

Outcome = Reconstruction | BaseException
RecordFn = Callable[[ObservedUpdate, str, Outcome], object]
log = logging.getLogger("fedsim")
ROUND_FILE = re.compile(r"round_(\d+)\.pt$")


def attack_keys(attacks: list[Attack]) -> list[str]:
    """A directory name per configured attack: its name, suffixed by its position when a name repeats."""
    names = [a.name for a in attacks]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def owner(attack: Attack | type[Attack], attack_index: int, client_id: int, workers: int, attacks: int = 1) -> int:
    """The worker that runs ``attack`` on an update of ``client_id`` (see the module docstring). A stateless attack
    keeps a round's updates together (one batched inversion) when there are at least as many attacks as workers,
    else it spreads them by client."""
    if attack.state_scope == "global" or (attack.state_scope == "none" and attacks >= workers):
        return attack_index % workers
    return client_id % workers


def latest_state(folder: Path) -> Path | None:
    files = [(int(m.group(1)), p) for p in folder.glob("round_*.pt") if (m := ROUND_FILE.search(p.name))]
    return max(files)[1] if files else None


class AttackWorker:
    """Holds one instance of every configured attack and runs the ones it owns on batches of observed updates."""

    def __init__(self, attack_specs: list[dict], threat: ThreatModel, device: str = "cpu", threads: int = 1,
                 seed_root: int = 0, state_dir: str | None = None, worker_index: int = 0) -> None:
        torch.set_num_threads(threads)
        self.attacks: list[Attack] = [build_attack(spec) for spec in attack_specs]
        self.keys = attack_keys(self.attacks)
        self.threat, self.device, self.seed_root = threat, device, seed_root
        self.state_dir = Path(state_dir) if state_dir else None
        self.worker_index = worker_index
        self.restored: dict[str, int] = {}  # attack key -> round of the state loaded at start-up
        for index, attack in enumerate(self.attacks):
            folder = self._state_folder(index)
            path = latest_state(folder) if folder is not None and folder.is_dir() else None
            if path is not None:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                attack.load_state_dict(payload["state"])
                self.restored[self.keys[index]] = int(payload["round"])

    def _state_folder(self, index: int) -> Path | None:
        attack = self.attacks[index]
        if self.state_dir is None or attack.state_scope == "none":
            return None
        folder = self.state_dir / self.keys[index]
        return folder / f"worker_{self.worker_index}" if attack.state_scope == "client" else folder

    def run(self, observed: list[ObservedUpdate], attack_index: int) -> list[tuple[int, str, Outcome]]:
        """(index into ``observed``, attack name, reconstruction or the exception it raised); ``observed`` all
        belong to one round."""
        attack = self.attacks[attack_index]
        server_round = observed[0].round
        seed = attack_seed(self.seed_root, server_round, attack_index)
        try:
            recs = attack.reconstruct_many(observed, self.threat, device=self.device, seed=seed)
            out: list[tuple[int, str, Outcome]] = [(i, attack.name, rec) for i, rec in enumerate(recs)]
        except Exception as err:  # noqa: BLE001 - a failing attack becomes error rows, the others still run
            out = [(i, attack.name, err) for i in range(len(observed))]
        if attack.state_scope != "none":
            folder = self._state_folder(attack_index)
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            try:
                attack.end_round(server_round, device=self.device, seed=seed, folder=folder)
            except Exception:  # noqa: BLE001 - the round's rows stand; the state stays as it was learnt so far
                log.exception("%s: end of round %d failed", self.keys[attack_index], server_round)
            self._save(attack_index, server_round)
        return out

    def _save(self, index: int, server_round: int) -> None:
        folder = self._state_folder(index)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"round_{server_round:03d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"round": server_round, "state": self.attacks[index].state_dict()}, tmp)
        os.replace(tmp, path)  # a worker killed mid-save leaves the previous round's file intact

    def ping(self) -> dict[str, int]:
        """The states restored at start-up (attack key -> round)."""
        return dict(self.restored)


class AttackerPool:
    def __init__(self, attack_specs: list[dict], threat: ThreatModel, record: RecordFn, *, executor: str = "ray",
                 workers: int = 2, threads: int = 1, device: str = "cpu", seed_root: int = 0,
                 gpus_per_worker: float | None = None, state_dir: str | Path | None = None,
                 on_submit: Callable[[int], None] | None = None) -> None:
        self.record = record
        self.executor = executor
        self.on_submit = on_submit
        self.attacks = [lookup(ATTACKS, spec.get("name"), "attack") for spec in attack_specs]  # classes, for routing
        self._errors: list[BaseException] = []
        state = str(state_dir) if state_dir is not None else None
        if executor == "inline":
            self._inline = AttackWorker(attack_specs, threat, device, threads, seed_root, state, 0)
            self.workers = 1
            return
        if executor != "ray":
            raise ValueError(f"unknown executor {executor!r}; use ray or inline")
        import ray

        if not ray.is_initialized():
            raise RuntimeError("the ray executor needs Ray initialised first")
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 / workers if device.startswith("cuda") else 0.0
        # A restarted actor runs __init__ again and so reloads the newest saved attacker state.
        remote = ray.remote(num_cpus=0, num_gpus=gpus_per_worker, max_restarts=3)(AttackWorker)
        self.workers = workers
        self._actors = [remote.remote(attack_specs, threat, device, threads, seed_root, state, w)
                        for w in range(workers)]
        self._pending: dict = {}  # ObjectRef -> observed list
        self._cv = threading.Condition()
        self._closed = False
        self._collector = threading.Thread(target=self._collect, name="attacker-collector", daemon=True)
        self._collector.start()

    def tasks(self, observed: list[ObservedUpdate]) -> list[tuple[int, int, list[ObservedUpdate]]]:
        """(worker, attack index, updates) for one round's updates, in a fixed order."""
        grouped: dict[tuple[int, int], list[ObservedUpdate]] = {}
        for index, attack in enumerate(self.attacks):
            for obs in observed:
                worker = owner(attack, index, obs.client_id, self.workers, len(self.attacks))
                grouped.setdefault((worker, index), []).append(obs)
        return [(w, a, batch) for (w, a), batch in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0]))]

    # -- submission -------------------------------------------------------------------------------------------
    def submit(self, observed: list[ObservedUpdate]) -> None:
        if not observed:
            return
        if self.on_submit:
            self.on_submit(len(observed) * len(self.attacks))
        for worker, attack_index, batch in self.tasks(observed):
            if self.executor == "inline":
                self._deliver(batch, self._inline.run(batch, attack_index))
                continue
            with self._cv:
                self._pending[self._actors[worker].run.remote(batch, attack_index)] = (batch, self.attacks[attack_index].name)
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
                    batch, name = self._pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a dead actor: every update of the batch gets an error row
                    results = [(i, name, err) for i in range(len(batch))]
                self._deliver(batch, results)
                with self._cv:
                    self._cv.notify_all()

    def drain(self, timeout: float | None = None) -> None:
        """Block until every submitted attack has been recorded."""
        if self.executor == "inline":
            if self._errors:
                raise self._errors[0]
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
