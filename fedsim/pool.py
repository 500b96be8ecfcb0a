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

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .contract import ATTACKS, Attack, ObservedUpdate, Reconstruction, ThreatModel, build_attack
from .registry import lookup
from .seeds import attack_seed

Outcome = Reconstruction | BaseException
RecordFn = Callable[[ObservedUpdate, str, Outcome], object]
log = logging.getLogger("fedsim")
ROUND_FILE = re.compile(r"round_(\d+)\.pt$")
POLL_SECONDS = 0.1  # how often the collector polls Ray for finished attack calls
CONTROL = "control"  # an attacker actor's second thread: pings and placement, answered while an attack runs


class RayGone(RuntimeError):
    """Ray was shut down under the pool (Flower's runtime does so on Ctrl-C before fedsim sees the interrupt)."""


def ray_call(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` (a Ray call) under Ray's own lock around ``ray.init``/``ray.shutdown``, and only while
    Ray is up. A call racing a shutdown from another thread does two kinds of harm, both seen here: made after it,
    Ray's auto-init starts a fresh local Ray whose GCS client exits the whole process 60 s after that one goes away;
    made during it, the core worker is torn down under the call (ray-project/ray#31145). So the pool never blocks
    inside Ray either: it polls (timeout 0) and waits in Python, and a shutdown waits at most for one poll."""
    import ray
    from ray._private import worker

    with getattr(worker, "_connect_or_shutdown_lock", None) or contextlib.nullcontext():
        if not ray.is_initialized():
            raise RayGone("Ray is shut down")
        return fn(*args, **kwargs)


def attack_keys(attacks: list[Attack]) -> list[str]:
    """A directory name per configured attack: its name, suffixed by its position when a name repeats."""
    names = [a.name for a in attacks]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def owner(attack: Attack | type[Attack], attack_index: int, client_id: int, workers: int, attacks: int = 1) -> int:
    """The worker that runs ``attack`` on an update of ``client_id`` (see the module docstring). A stateless attack
    keeps a round's updates together (one batched inversion) when there are at least as many attacks as workers,
    else it spreads them by client."""
    scope = attack.state_scope if isinstance(attack, type) else attack.kept_scope
    if scope == "global" or (scope == "none" and attacks >= workers):
        return attack_index % workers
    return client_id % workers


def latest_state(folder: Path) -> Path | None:
    files = [(int(m.group(1)), p) for p in folder.glob("round_*.pt") if (m := ROUND_FILE.search(p.name))]
    return max(files)[1] if files else None


class AttackWorker:
    """Holds one instance of every configured attack and runs the ones it owns on batches of observed updates."""

    def __init__(self, attack_specs: list[dict], threat: ThreatModel, device: str = "cpu", threads: int = 1,
                 seed_root: int = 0, state_dir: str | None = None, worker_index: int = 0, learn: bool = True,
                 python_path: tuple[str, ...] = ()) -> None:
        # An audited Flower app's model is imported by path: its source tree must be importable in this process
        sys.path[:0] = [p for p in python_path if p not in sys.path]
        torch.set_num_threads(threads)
        self.learn = learn  # end_round after each round (a one-off attack, fedsim attack, has no next round)
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
        if self.state_dir is None or attack.kept_scope == "none":
            return None
        folder = self.state_dir / self.keys[index]
        return folder / f"worker_{self.worker_index}" if attack.kept_scope == "client" else folder

    def run(self, observed: list[ObservedUpdate], attack_index: int) -> list[tuple[int, str, Outcome]]:
        """(index into ``observed``, attack key, reconstruction or the exception it raised); ``observed`` all
        belong to one round."""
        attack = self.attacks[attack_index]
        server_round = observed[0].round
        seed = attack_seed(self.seed_root, server_round, attack_index)
        try:
            recs = attack.reconstruct_many(observed, self.threat, device=self.device, seed=seed)
            out: list[tuple[int, str, Outcome]] = [(i, self.keys[attack_index], rec) for i, rec in enumerate(recs)]
        except Exception as err:  # noqa: BLE001 - a failing attack becomes error rows, the others still run
            out = [(i, self.keys[attack_index], err) for i in range(len(observed))]
        # A round the restored state has already learnt from (a resumed backlog) is attacked, not learnt again.
        if (self.learn and attack.kept_scope != "none"
                and server_round > self.restored.get(self.keys[attack_index], -1)):
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

    def where(self) -> dict[str, str]:
        """The Ray node, host and GPUs (Ray's assignment, comma-separated; empty on CPU) this worker runs on."""
        import socket

        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        gpus = ",".join(str(g) for g in ray.get_gpu_ids()) if ray.is_initialized() else ""
        return {"node_id": node, "host": socket.gethostname(), "pid": str(os.getpid()), "gpus": gpus}


@dataclass
class _Task:
    """One (worker, attack, round batch) call in flight."""

    batch: list[ObservedUpdate]
    key: str
    worker: int
    attack_index: int
    seq: int  # submission order (an actor runs its calls in this order)
    retries: int = 1  # resubmissions left after the actor died under it
    started: float | None = None  # when it became its actor's oldest call (the one running)
    queued_at_kill: bool = False  # lost, still queued, when a timeout killed its actor: resent without spending a retry


class AttackTimeout(TimeoutError):
    pass


class AttackerStartError(RuntimeError):
    """An attacker worker's constructor raised on its node (it would again on every restart): no retry."""


class AttackerPool:
    """Runs every configured attack on every submitted update exactly once per (round, client, attack key):
    ``done`` holds the keys that already have a row (a resumed run passes the rows it kept), and a submission
    reruns only the attacks missing a row of that round (all of the round's updates, so a batched inversion sees the
    same batch as the first time) and records only the missing rows. ``on_round_done(round)`` fires when every
    attack has a row for every update submitted for that round."""

    def __init__(self, attack_specs: list[dict], threat: ThreatModel, record: RecordFn, *, executor: str = "ray",
                 workers: int = 2, threads: int = 1, device: str = "cpu", seed_root: int = 0,
                 gpus_per_worker: float | None = None, state_dir: str | Path | None = None,
                 on_submit: Callable[[int], None] | None = None, done: set[tuple[int, int, str]] | None = None,
                 on_round_done: Callable[[int], None] | None = None,
                 resources: dict[str, float] | None = None, timeout: float | None = None, learn: bool = True,
                 python_path: tuple[str, ...] = ()) -> None:
        self.record = record
        self.executor = executor
        self.timeout = timeout  # seconds one call may run (ray executor); past it: error rows, the actor restarts
        self.on_submit = on_submit
        self.on_round_done = on_round_done
        self.attacks = [lookup(ATTACKS, spec.get("name"), "attack") for spec in attack_specs]  # classes, for routing
        self.keys = attack_keys(self.attacks)
        self.done: set[tuple[int, int, str]] = set(done or ())
        self._expected: dict[int, set[tuple[int, int, str]]] = {}
        self._rows_lock = threading.Lock()
        self._errors: list[BaseException] = []
        state = str(state_dir) if state_dir is not None else None
        if executor == "inline":
            self._inline = AttackWorker(attack_specs, threat, device, threads, seed_root, state, 0, learn, python_path)
            self.workers = 1
            return
        if executor != "ray":
            raise ValueError(f"unknown executor {executor!r}; use ray or inline")
        import ray

        if not ray.is_initialized():
            raise RuntimeError("the ray executor needs Ray initialised first")
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 / workers if device.startswith("cuda") else 0.0
        # Ray restarts a dead actor (killed, out of memory, or by a timeout here); its __init__ reloads the newest
        # saved attacker state. Calls lost with it are resubmitted once by the collector, then become error rows.
        remote = ray.remote(num_cpus=0, num_gpus=gpus_per_worker, resources=dict(resources or {}),
                            max_restarts=-1, max_task_retries=0, concurrency_groups={CONTROL: 1})(AttackWorker)
        self.workers = workers
        self._actors = [remote.remote(attack_specs, threat, device, threads, seed_root, state, w, learn, python_path)
                        for w in range(workers)]
        self._pending: dict = {}  # ObjectRef -> _Task
        self._seq = 0
        self._cv = threading.Condition()
        self._closed = False
        self._aborted = False  # an interrupted run: no Ray call from here on (Ray may already be gone)
        self._collector = threading.Thread(target=self._collect, name="attacker-collector", daemon=True)
        self._collector.start()

    def placement(self, timeout: float = 300.0) -> list[dict[str, str]]:
        """Where each worker runs (waits for the actors to start)."""
        if self.executor == "inline":
            return [self._inline.where()]
        import ray

        refs = [ray_call(actor.where.options(concurrency_group=CONTROL).remote) for actor in self._actors]
        deadline = time.monotonic() + timeout
        while len(ray_call(ray.wait, refs, num_returns=len(refs), timeout=0)[0]) < len(refs):  # see ray_call
            if time.monotonic() > deadline:
                raise TimeoutError(f"the attacker workers did not start within {timeout:g} s")
            time.sleep(POLL_SECONDS)
        return ray_call(ray.get, refs)

    def tasks(self, observed: list[ObservedUpdate],
              attack_indices: list[int] | None = None) -> list[tuple[int, int, list[ObservedUpdate]]]:
        """(worker, attack index, updates) for one round's updates, in a fixed order."""
        grouped: dict[tuple[int, int], list[ObservedUpdate]] = {}
        for index, attack in enumerate(self.attacks):
            if attack_indices is not None and index not in attack_indices:
                continue
            for obs in observed:
                worker = owner(attack, index, obs.client_id, self.workers, len(self.attacks))
                grouped.setdefault((worker, index), []).append(obs)
        return [(w, a, batch) for (w, a), batch in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0]))]

    # -- submission -------------------------------------------------------------------------------------------
    def submit(self, observed: list[ObservedUpdate]) -> None:
        """One round's observed updates."""
        if not observed:
            return
        server_round = observed[0].round
        wanted = {(o.round, o.client_id, key) for o in observed for key in self.keys}
        with self._rows_lock:
            self._expected.setdefault(server_round, set()).update(wanted)
            missing = wanted - self.done
        if not missing:
            self._round_check(server_round)
            return
        indices = [i for i, key in enumerate(self.keys) if any(m[2] == key for m in missing)]
        if self.on_submit:
            self.on_submit(len(missing))
        for worker, attack_index, batch in self.tasks(observed, indices):
            if self.executor == "inline":
                self._deliver(batch, self._inline.run(batch, attack_index))
                continue
            self._launch(_Task(batch, self.keys[attack_index], worker, attack_index, seq=0))

    def _deliver(self, observed: list[ObservedUpdate], results: list[tuple[int, str, Outcome]]) -> None:
        rounds = set()
        for index, key, outcome in results:
            obs = observed[index]
            row_key = (obs.round, obs.client_id, key)
            with self._rows_lock:
                if row_key in self.done:  # rerun only for the batch's sake: its row exists
                    continue
                self.done.add(row_key)
            rounds.add(obs.round)
            try:
                self.record(obs, key, outcome)
            except BaseException as err:  # noqa: BLE001 - keep collecting; re-raised in drain()
                self._errors.append(err)
        for server_round in rounds:
            self._round_check(server_round)

    def _round_check(self, server_round: int) -> None:
        with self._rows_lock:
            complete = server_round in self._expected and self._expected[server_round] <= self.done
            if complete:
                del self._expected[server_round]
        if complete and self.on_round_done:
            self.on_round_done(server_round)

    def _launch(self, task: _Task) -> None:
        if self._aborted:
            return
        try:
            ref = ray_call(self._actors[task.worker].run.remote, task.batch, task.attack_index)
        except RayGone:  # the update stays queued on disk for --resume
            return
        with self._cv:
            self._seq += 1
            task.seq, task.started = self._seq, None
            self._pending[ref] = task
            self._cv.notify_all()

    # -- collection -------------------------------------------------------------------------------------------
    def _collect(self) -> None:
        try:
            self._collect_results()
        except RayGone:
            self._stop_without_ray()

    def _collect_results(self) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._aborted or (not self._pending and self._closed):
                    return
                refs = list(self._pending)
            try:
                ready, _ = ray_call(ray.wait, refs, num_returns=len(refs), timeout=0)  # polled: see ray_call
            except RayGone:
                raise
            except Exception:  # noqa: BLE001 - Ray went away under an interrupted run: stop quietly
                if self._ray_gone():
                    return self._stop_without_ray()
                raise
            if self._ray_gone():
                return self._stop_without_ray()
            if not ready:
                if self.timeout is not None:
                    self._enforce_timeout()
                with self._cv:
                    self._cv.wait(timeout=POLL_SECONDS)
                continue
            for ref in ready:
                # a call leaves _pending only once its rows are recorded or its retry is in flight, so drain()
                # never returns while a row is still on its way
                with self._cv:
                    task = self._pending.get(ref)
                if task is None:  # timed out and recorded already
                    continue
                try:
                    results = ray_call(ray.get, ref)
                except RayGone:
                    raise
                except RayTaskError as err:  # the attack itself raised: that is its row
                    results = [(i, task.key, err) for i in range(len(task.batch))]
                except Exception as err:  # noqa: BLE001 - Ray failed, not the attack: no row says otherwise
                    if self._ray_gone():  # Ctrl-C (Flower shuts Ray down first): the update stays queued for --resume
                        return self._stop_without_ray()
                    if not isinstance(err, RayActorError):
                        self._errors.append(err)  # the run fails loudly; its queued updates are attacked on --resume
                        self._settle(ref)
                        continue
                    if err.actor_init_failed:  # the worker cannot start there (a plugin missing on that node, ...)
                        err = AttackerStartError(f"attacker worker {task.worker} could not start: "
                                                 f"{str(err).strip().splitlines()[-1]}")
                    elif task.queued_at_kill or task.retries > 0:  # the actor died under it: retry once
                        if task.queued_at_kill:
                            task.queued_at_kill = False
                        else:
                            task.retries -= 1
                            log.warning("attacker worker %d died during %s (round %d); retrying once", task.worker,
                                        task.key, task.batch[0].round)
                        self._await_restart(task.worker)
                        self._launch(task)
                        self._settle(ref)
                        continue
                    results = [(i, task.key, err) for i in range(len(task.batch))]
                self._deliver(task.batch, results)
                self._settle(ref)
            if self.timeout is not None:
                self._enforce_timeout()

    def _ray_gone(self) -> bool:
        """An interrupted run: aborted, or Ray already shut down under us (a Ray call now would start a new one)."""
        import ray

        return self._aborted or not ray.is_initialized()

    def _stop_without_ray(self) -> None:
        """The collector's last act once Ray is gone: no row for the calls in flight (their updates stay queued, so
        ``--resume`` attacks them) and ``drain`` fails instead of waiting for them."""
        with self._cv:
            if self._pending and not self._aborted:
                self._errors.append(RuntimeError(f"Ray shut down with {len(self._pending)} attack batches running; "
                                                 "their updates stay queued for --resume"))
            self._pending.clear()
            self._closed = True
            self._cv.notify_all()

    def _settle(self, ref) -> None:
        with self._cv:
            self._pending.pop(ref, None)
            self._cv.notify_all()

    def _await_restart(self, worker: int, timeout: float = 120.0) -> None:
        """Until Ray has the actor back (a call sent while it restarts would fail again)."""
        import ray

        deadline = time.monotonic() + timeout
        # the ping runs in the actor's control thread: it is answered at once, not after the attack calls that
        # Ray held back during the restart and now runs (one may hang until its own timeout)
        ping = self._actors[worker].ping.options(concurrency_group=CONTROL).remote
        sent = (ray_call(ping), time.monotonic())
        while time.monotonic() < deadline and not self._aborted:
            if ray_call(ray.wait, [sent[0]], timeout=0)[0]:
                try:
                    ray_call(ray.get, sent[0])
                    return
                except ray.exceptions.RayActorError:  # still restarting: ask again
                    sent = (ray_call(ping), time.monotonic())
            elif time.monotonic() - sent[1] > 10.0:  # a ping sent to the dying process may never be answered
                sent = (ray_call(ping), time.monotonic())
            time.sleep(POLL_SECONDS)

    def _enforce_timeout(self) -> None:
        """The oldest call of each actor is the one running: if it has run past ``timeout``, its rows become
        errors and the actor is killed (Ray restarts it; the calls queued behind it are resubmitted once)."""
        import ray

        now = time.monotonic()
        expired = []
        with self._cv:
            running: dict[int, tuple[object, _Task]] = {}
            for ref, task in self._pending.items():
                if task.worker not in running or task.seq < running[task.worker][1].seq:
                    running[task.worker] = (ref, task)
            for ref, task in running.values():
                if task.started is None:
                    task.started = now
                elif now - task.started > self.timeout:
                    expired.append((ref, task))
        for ref, task in expired:
            err = AttackTimeout(f"{task.key} ran past attack.timeout={self.timeout:g} s (round {task.batch[0].round})")
            log.warning("%s; restarting attacker worker %d", err, task.worker)
            self._deliver(task.batch, [(i, task.key, err) for i in range(len(task.batch))])
            self._settle(ref)
            with self._cv:  # the calls queued behind it die with the actor through no fault of their own
                for other in self._pending.values():
                    other.queued_at_kill |= other.worker == task.worker
            ray_call(ray.kill, self._actors[task.worker], no_restart=False)
            time.sleep(1.0)  # the kill is asynchronous
            self._await_restart(task.worker)
            with self._cv:  # calls queued behind it have not run yet: their clocks start when they do
                for other in self._pending.values():
                    if other.worker == task.worker:
                        other.started = None
        if expired:
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

    def abort(self) -> None:
        """Stop now (an interrupted run): the collector makes no further Ray call, pending calls are forgotten.
        Their updates stay in the run directory's queue, so ``--resume`` attacks them."""
        if self.executor == "inline":
            return
        with self._cv:
            self._closed = self._aborted = True
            self._pending.clear()
            self._cv.notify_all()
        self._collector.join(timeout=5)

    def close(self) -> None:
        if self.executor == "inline":
            return
        self.drain()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._collector.join(timeout=5)
