"""Sweeps: one federation run per point of a grid over config keys, their rows collected into one table.

A sweep file names a base run config and its axes::

    base = "quickstart.toml"              # relative to the sweep file
    name = "noise_vs_batch"
    [set]                                  # applied to every point
    "federation.rounds" = 2
    [[axes]]                               # one key, its values are the column
    key = "client.batch_size"
    values = [1, 4, 16]
    [[axes]]                               # named points, each setting several keys; the label is the column
    name = "defense"
    points = [{label = "none", set = {defenses = []}},
              {label = "noise 1e-2", set = {defenses = [{name = "gaussian_noise", std = 1e-2}]}}]

The grid is the product of the axes. Every point is a ``fedsim run`` of the base config with the point's keys set
(``--set``), in its own directory ``<output_dir>/<name>/points/<NNN-label>``; ``point.json`` there records the
point, its command and each attempt. Running the sweep again continues it: finished points are kept, a point that
was cut off resumes from its last finished round (``fedsim run --resume``), the rest run. The sweep directory's
``leakage.parquet`` and ``rounds.parquet`` hold every point's rows with the swept values as columns, and
``summary.parquet`` one row per point and attack (leakage over all attacked images beside the final utility and
epsilon).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import (ConfigError, _format_validation_error, apply_override, load_config, read_toml,
                     resume_conflict)
from .results import load_run, read_table


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AxisPoint(Strict):
    label: str
    set: dict[str, Any]  # dotted config key -> value


class Axis(Strict):
    key: str | None = None
    values: list[Any] | None = None
    name: str | None = None
    points: list[AxisPoint] | None = None

    @model_validator(mode="after")
    def _one_form(self):
        if (self.key is None) == (self.points is None):
            raise ValueError("an axis has either key and values, or name and points")
        if self.key is not None and not self.values:
            raise ValueError(f"axis {self.key}: values must be a non-empty list")
        if self.points is not None:
            if not self.name:
                raise ValueError("an axis of points needs a name (its column)")
            if not self.points:
                raise ValueError(f"axis {self.name}: points must be a non-empty list")
            labels = [p.label for p in self.points]
            if len(set(labels)) != len(labels):
                raise ValueError(f"axis {self.name}: point labels must be distinct")
        return self

    @property
    def column(self) -> str:
        return self.key if self.key is not None else self.name  # type: ignore[return-value]

    def choices(self) -> list[tuple[Any, dict[str, Any]]]:
        """(column value, keys it sets) per value of the axis."""
        if self.key is not None:
            return [(v, {self.key: v}) for v in self.values or []]
        return [(p.label, dict(p.set)) for p in self.points or []]


class SweepSpec(Strict):
    base: str
    name: str
    output_dir: str = "runs/sweeps"
    parallel: int = Field(default=1, ge=1)  # points run at once (each on its own local Ray), capped by the cores
    set: dict[str, Any] = Field(default_factory=dict)
    axes: list[Axis] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_columns(self):
        columns = [a.column for a in self.axes]
        if len(set(columns)) != len(columns):
            raise ValueError(f"two axes share the column {next(c for c in columns if columns.count(c) > 1)!r}")
        return self


@dataclass
class Point:
    index: int
    values: dict[str, Any]  # axis column -> value
    overrides: dict[str, Any]  # dotted key -> value (the sweep's set, then the axes')
    directory: Path

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.values.items())


@dataclass
class Sweep:
    spec: SweepSpec
    file: Path
    root: Path
    points: list[Point] = field(default_factory=list)

    @property
    def base(self) -> Path:
        return (self.file.parent / self.spec.base).resolve()

    @property
    def columns(self) -> list[str]:
        return [a.column for a in self.spec.axes]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in ".-" else "_" for c in text)
    return "_".join(filter(None, keep.split("_")))[:60]


def toml_value(value: Any) -> str:
    """A TOML inline value (for ``--set key=<value>``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                 else repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} as a TOML value")


def load_sweep(path: Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file, expand its grid and validate every point's config (bad input fails here, before any
    run starts). ``overrides`` (``--set``) apply to every point after the sweep's own keys."""
    path = Path(path)
    raw = read_toml(path, "sweep")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err).replace("invalid config", f"invalid sweep {path}")) from None
    sweep = Sweep(spec, path, Path(spec.output_dir) / spec.name)
    if not sweep.base.is_file():
        raise ConfigError(f"base: run config file not found: {sweep.base}")
    extra: dict[str, Any] = {}
    for assignment in overrides or []:
        probe: dict = {}
        apply_override(probe, assignment)
        key, value = assignment.split("=", 1)
        extra[key.strip()] = _dig(probe, key.strip())
    for index, combo in enumerate(itertools.product(*(a.choices() for a in spec.axes))):
        values = {a.column: v for a, (v, _) in zip(spec.axes, combo)}
        keys: dict[str, Any] = {}
        for axis, (_, sets) in zip(spec.axes, combo):
            for key, value in sets.items():
                if key in keys:
                    raise ConfigError(f"axes: {key!r} is set by two axes ({axis.column} and an earlier one)")
                keys[key] = value
        overrides_of = {**spec.set, **keys, **extra}
        name = f"{index:03d}-" + _slug("-".join(_short(v) for v in values.values()))
        sweep.points.append(Point(index, values, overrides_of, sweep.root / "points" / name))
    for point in sweep.points:
        point_config(sweep, point)  # every point must be a valid run
    return sweep


def _dig(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def point_arguments(sweep: Sweep, point: Point) -> list[str]:
    """The ``--set`` assignments that make the base run config this point (its name and directory included)."""
    assignments = [f"{k}={toml_value(v)}" for k, v in point.overrides.items()]
    assignments += [f"output_dir={toml_value(str(point.directory.parent))}",
                    f"name={toml_value(point.directory.name)}"]
    return assignments


def point_config(sweep: Sweep, point: Point):
    """The point's resolved config, read exactly as its ``fedsim run`` will read it."""
    try:
        return load_config(sweep.base, point_arguments(sweep, point))
    except ConfigError as err:
        raise ConfigError(f"point {point.index} ({point.label}): {err}") from None


# ------------------------------------------------------------------------------------------------------------
# Running


def read_state(point: Point) -> dict:
    try:
        return json.loads((point.directory / "point.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(point: Point, state: dict) -> None:
    point.directory.mkdir(parents=True, exist_ok=True)
    tmp = point.directory / "point.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, point.directory / "point.json")


def process_alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs. A killed process nobody has reaped yet (a zombie: in a container whose
    init does not reap, a killed sweep's point stays one) has stopped running, though signal 0 still reaches it."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "(zombie)" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # no procfs (macOS): signal 0 is all there is
        return True


def point_status(point: Point) -> dict:
    """What a point's ``point.json`` says, with a ``running`` point whose process is gone reported as ``cut off``
    (the sweep was killed; the next run resumes it)."""
    state = read_state(point)
    attempts = state.get("attempts", [])
    status = state.get("status", "not started")
    if status == "running" and not process_alive(attempts[-1].get("pid") if attempts else None):
        status = "cut off"
    last = attempts[-1] if attempts else {}
    seconds = (last["finished"] - last["started"]) if "finished" in last else (
        time.time() - last["started"] if status == "running" else None)
    return {"index": point.index, "point": point.label, "status": status, "attempts": len(attempts),
            "seconds": seconds, "error": state.get("error", "")}


def check_finished_points(sweep: Sweep) -> None:
    """A finished point whose stored config differs from what the sweep file now says is an error (a new sweep
    name, or ``--fresh``, is what the user wants then)."""
    for point in sweep.points:
        if read_state(point).get("status") != "done":
            continue
        stored = json.loads((point.directory / "config.json").read_text())
        conflict = resume_conflict(stored, point_config(sweep, point).model_dump())
        if conflict:
            raise ConfigError(f"point {point.index} ({point.label}) finished with a different config ({conflict}); "
                              f"use another sweep name or --fresh")


def parallel_points(sweep: Sweep, requested: int | None = None) -> int:
    """Points run at once: what was asked, at most one per core (each point's clients take one core)."""
    return max(1, min(requested or sweep.spec.parallel, os.cpu_count() or 1, len(sweep.points)))


def run_point(sweep: Sweep, point: Point, *, cores: int | None, ray_address: str | None, stop: threading.Event,
              log: Callable[[str], None]) -> str:
    """Run (or resume) one point as a ``fedsim run`` process; its status: done or failed."""
    state = read_state(point)
    resume = point.directory.joinpath("config.json").is_file()
    command = [sys.executable, "-m", "fedsim.cli", "run", str(sweep.base), "--quiet"]
    for assignment in point_arguments(sweep, point):
        command += ["--set", assignment]
    if cores:
        command += ["--set", f"ray.num_cpus={cores}"]
    if ray_address:
        command += ["--ray-address", ray_address]
    if resume:
        command.append("--resume")
    attempts = state.get("attempts", []) + [{"started": time.time(), "resumed": resume}]
    state = {"index": point.index, "values": point.values, "overrides": point.overrides, "command": command,
             "status": "running", "attempts": attempts}
    _write_state(point, state)
    log(f"point {point.index} ({point.label}): {'resumed' if resume else 'started'}")
    with open(point.directory / "run.log", "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        attempts[-1]["pid"] = proc.pid
        _write_state(point, state)
        while proc.poll() is None:
            if stop.wait(0.5):
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return "stopped"
    attempts[-1].update(finished=time.time(), returncode=proc.returncode)
    if proc.returncode == 0:
        state["status"] = "done"
    else:
        state["status"] = "failed"
        state["error"] = _last_error(point.directory / "run.log")
    _write_state(point, state)
    seconds = attempts[-1]["finished"] - attempts[-1]["started"]
    log(f"point {point.index} ({point.label}): {state['status']} in {seconds:.0f} s"
        + (f": {state['error']}" if state["status"] == "failed" else ""))
    return state["status"]


def _die_with_parent() -> None:
    """In the point's process before it starts: the kernel kills it when the sweep process dies (even by kill -9),
    so a killed sweep leaves no point running on unseen (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _last_error(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def run_sweep(sweep: Sweep, *, parallel: int | None = None, fresh: bool = False, ray_address: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every point not yet done (``parallel`` at once); returns counts by status. Tables are collected after
    each point, so a sweep stopped at any moment has every finished point's rows.

    One point at a time, the points join one Ray cluster (``ray_address``, else a local one the sweep starts):
    Ray's start-up is paid once. Points in parallel each start their own local Ray on their share of the cores,
    because Flower sizes a simulation's client pool from the whole cluster and two on one cluster would wait on
    each other's actors."""
    workers = parallel_points(sweep, parallel)
    if ray_address and workers > 1:
        raise ConfigError(f"--ray-address with {workers} points at once: on one cluster the points run one at a "
                          f"time (Flower sizes each simulation's clients from the whole cluster); drop --parallel")
    if fresh:
        shutil.rmtree(sweep.root, ignore_errors=True)
    sweep.root.mkdir(parents=True, exist_ok=True)
    check_finished_points(sweep)
    (sweep.root / "sweep.json").write_text(json.dumps(
        {"file": str(sweep.file), "base": str(sweep.base), "spec": sweep.spec.model_dump(),
         "columns": sweep.columns, "points": [p.directory.name for p in sweep.points],
         "values": {p.directory.name: p.values for p in sweep.points}}, indent=2, default=str))
    todo = [p for p in sweep.points if read_state(p).get("status") != "done"]
    counts = {"done": len(sweep.points) - len(todo), "failed": 0, "stopped": 0}
    if counts["done"]:
        log(f"{counts['done']} of {len(sweep.points)} points already finished")
    cores = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    stop = threading.Event()
    lock = threading.Lock()
    queue = list(todo)
    local_ray = workers == 1 and not ray_address and bool(todo)
    if local_ray:
        ray_address = _start_ray(point_config(sweep, todo[0]))

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                point = queue.pop(0)
            status = run_point(sweep, point, cores=cores, ray_address=ray_address if workers == 1 else None,
                               stop=stop, log=log)
            with lock:
                counts[status] += 1
                collect(sweep)

    threads = [threading.Thread(target=worker, name=f"sweep-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
        raise
    finally:
        collect(sweep)
        if local_ray:
            import ray

            ray.shutdown()
    return counts


def _start_ray(cfg) -> str:
    """A local Ray cluster for the sweep's points to join (sized and placed as a run's own would be)."""
    import ray

    from .driver import _ray_settings

    settings = _ray_settings(cfg, None)
    ray.init(**{k: v for k, v in settings.items() if v is not None})
    return ray.get_runtime_context().gcs_address


# ------------------------------------------------------------------------------------------------------------
# Collecting


def _cell(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def collect(sweep: Sweep) -> dict[str, pd.DataFrame]:
    """Every finished point's leakage, rounds and per-image rows (``images``: one row per attacked image with its
    PSNR / SSIM / LPIPS; the same image has the same round, client and index in every point that attacks it), with
    ``point`` and the swept values as columns, and the per-point summary; written to the sweep directory."""
    leakage, rounds, images = [], [], []
    for point in sweep.points:
        if read_state(point).get("status") != "done":
            continue
        tags = {"point": point.directory.name, **{k: _cell(v) for k, v in point.values.items()}}
        for name, into in (("leakage.parquet", leakage), ("rounds.parquet", rounds)):
            frame = read_table(point.directory / name)
            if len(frame):
                into.append(frame.assign(**tags)[[*tags, *frame.columns]])
        per_image = load_run(point.directory).image_scores()
        if len(per_image):
            images.append(per_image.assign(**tags)[[*tags, *per_image.columns]])
    tables = {name: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
              for name, parts in (("leakage", leakage), ("rounds", rounds), ("images", images))}
    tables["summary"] = summarise(tables["leakage"], tables["rounds"], ["point", *sweep.columns],
                                  tables["images"])
    for name, frame in tables.items():
        tmp = sweep.root / f"{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, sweep.root / f"{name}.parquet")
    return tables


def summarise(leakage: pd.DataFrame, rounds: pd.DataFrame, keys: list[str],
              images: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per point and attack: leakage averaged over every attacked image (each update weighted by its batch size),
    its spread over updates (``*_std``) and over images (``*_image_std``, from the points' kept reconstructions),
    and the point's test accuracy (after the last round, and ``utility``: the mean over the last tenth of the
    rounds) and epsilon."""
    if not len(leakage):
        return pd.DataFrame()
    ok = leakage[leakage.status == "ok"]
    out = []
    for group, rows in ok.groupby([*keys, "attack"], sort=False, dropna=False):
        w = rows.batch_size.astype(float)
        record = dict(zip([*keys, "attack"], group))
        record.update(updates=len(rows), images=int(w.sum()))
        for metric in ("psnr_mean", "psnr_best", "ssim_mean", "lpips_mean", "label_accuracy"):
            values = rows[metric].astype(float)
            record[metric] = float((values * w).sum() / w.sum()) if values.notna().all() else float("nan")
            record[f"{metric}_std"] = float(values.std(ddof=0))
        if images is not None and len(images):
            mine = images[(images.point == record["point"]) & (images.attack == record["attack"])]
            for metric in ("psnr", "ssim", "lpips"):
                values = mine[metric].astype(float)
                record[f"{metric}_image_std"] = float(values.std(ddof=0)) if values.notna().any() else float("nan")
        record["attack_seconds"] = float(rows.attack_seconds.mean())
        out.append(record)
    summary = pd.DataFrame(out)
    if len(rounds):
        last = rounds.sort_values("round").groupby("point").tail(1).set_index("point")
        first = rounds[rounds["round"] == 0].set_index("point")
        summary["final_round"] = summary.point.map(last["round"])
        summary["test_accuracy"] = summary.point.map(last["test_accuracy"])
        summary["initial_test_accuracy"] = summary.point.map(first["test_accuracy"])
        summary["epsilon"] = summary.point.map(last["epsilon"]) if "epsilon" in last else float("nan")
        summary["utility"] = summary.point.map(rounds.groupby("point").apply(utility, include_groups=False))
    return summary


def utility(rounds: pd.DataFrame) -> float:
    """A run's utility: its mean test accuracy over the last tenth of its rounds (at least the last one). The
    accuracy of one round on a few hundred test images swings by several points from round to round under
    FedSGD; the mean over the tail is what the trained model is worth."""
    trained = rounds[rounds["round"] > 0].sort_values("round")
    if not len(trained):
        return float("nan")
    tail = trained.tail(max(1, len(trained) // 10))
    return float(tail.test_accuracy.mean())
