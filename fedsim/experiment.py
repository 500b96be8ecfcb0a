"""Paper-table experiments: a TOML file of cases, run through the single-update path, summarised as markdown.

``fedsim experiment experiments/geiping2020_table1.toml`` runs every case (victim, client computation, attack) on
the same images, keeps every row in ``runs/experiments/<name>/leakage.parquet`` and writes
``experiments/<name>.md`` beside the config: per case N, PSNR mean +- std, SSIM, label accuracy, update fit, time,
and the paper's number. Trained victims are trained once (``fedsim train-victim`` recipe) and cached.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import (ClientConfig, ConfigError, _format_validation_error, apply_override, build_threat, read_toml,
                     registered)
from .contract import LABEL_METHODS, build_attack
from .data import load_dataset
from .defenses import build_defense
from .single import SingleUpdateJob, parse_indices, run_single


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VictimTraining(Strict):
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.05, gt=0)


class Victim(Strict):
    model: str = "lenet_zhu"
    width: int = 64
    activation: Literal["default", "sigmoid"] = "default"
    checkpoint: str | None = None
    train: VictimTraining | None = None  # train on the data set's training split before attacking


class Case(Strict):
    name: str
    victim: str
    batch_size: int = Field(default=1, ge=1)
    client: ClientConfig = Field(default_factory=ClientConfig)
    attack: dict[str, Any]
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    labels: Literal["known", "recovered"] = "recovered"
    label_method: Annotated[str, registered(lambda: LABEL_METHODS, "label method")] = "auto"
    distinct_labels: bool = False  # fill each update with the next images whose labels are new to it (as IG's code)
    paper: str = ""  # the published number, as printed


class Experiment(Strict):
    name: str
    title: str
    dataset: str = "cifar10"
    split: str = "test"
    indices: str = "0-99"
    seed: int = 0
    output_dir: str = "runs/experiments"
    notes: str = ""
    victims: dict[str, Victim]
    cases: list[Case]


def load_experiment(path: Path, overrides: list[str] | None = None) -> Experiment:
    raw = read_toml(path, "experiment")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    for i, case in enumerate(exp.cases):
        if case.victim not in exp.victims:
            raise ConfigError(f"cases.{i}.victim: unknown victim {case.victim!r}")
        build_attack(case.attack)
    return exp


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _victim_checkpoint(exp: Experiment, key: str, victim: Victim, out: Path, log) -> str | None:
    if victim.checkpoint or victim.train is None:
        return victim.checkpoint
    from .victims import train_centrally

    path = out / f"victim-{key}.pt"
    if not path.is_file():
        train = load_dataset(exp.dataset, "train")
        test = load_dataset(exp.dataset, "test")
        result = train_centrally(victim.model, train, test, epochs=victim.train.epochs,
                                 batch_size=victim.train.batch_size, lr=victim.train.lr, width=victim.width,
                                 seed=exp.seed, output=path, log=lambda *_: None, activation=victim.activation)
        (out / f"victim-{key}.txt").write_text(
            f"train accuracy {result['train_accuracy']:.4f}, test accuracy {result['test_accuracy']:.4f}\n")
        log(f"trained victim {key}: {result}")
    return str(path)


def run_experiment_file(path: Path, overrides: list[str] | None = None, only: list[str] | None = None,
                        device: str = "cpu", log=print) -> pd.DataFrame:
    exp = load_experiment(path, overrides)
    out = Path(exp.output_dir) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(exp.dataset, exp.split)
    indices = parse_indices(exp.indices)
    frames = []
    previous = out / "leakage.parquet"
    # The table lives next to the config, except when --set output_dir sends this run elsewhere (a side study must
    # not overwrite the committed table with its own rows): then it goes to that output directory.
    moved = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides or [])
    table_md = out / f"{exp.name}.md" if moved else path.with_suffix(".md")
    # Every row of a committed table is also kept beside it (<name>.rows.parquet), so a fresh checkout that has no
    # runs/ folder still merges new cases into the table instead of replacing it.
    committed = table_md.with_suffix(".rows.parquet")
    old = pd.read_parquet(previous) if previous.is_file() else (
        pd.read_parquet(committed) if committed.is_file() else None)
    for case in exp.cases:
        if only and not any(o.lower() in case.name.lower() for o in only):
            continue
        case_dir = out / slug(case.name)
        settings = {"case": case.model_dump(), "victim": exp.victims[case.victim].model_dump(),
                    "dataset": exp.dataset, "split": exp.split, "indices": exp.indices, "seed": exp.seed}
        explicit = {"case": case.model_dump(exclude_defaults=True),
                    "victim": exp.victims[case.victim].model_dump(exclude_defaults=True)}
        key = json.dumps(settings, sort_keys=True)
        if old is not None and (case_dir / "case.json").is_file() and case.name in set(old.case) \
                and same_settings(json.loads((case_dir / "case.json").read_text()), settings, explicit):
            frames.append(old[old.case == case.name])  # finished earlier with identical settings: reuse
            log(f"{case.name}: reused finished results")
            continue
        victim = exp.victims[case.victim]
        checkpoint = _victim_checkpoint(exp, case.victim, victim, out, log)
        defenses = [build_defense(d) for d in case.defenses]
        case_indices = distinct_label_order(indices, data.labels, case.batch_size) if case.distinct_labels else indices
        job = SingleUpdateJob(
            data=data, model_name=victim.model, indices=case_indices, batch_size=case.batch_size,
            attack=build_attack(case.attack), train=case.client.train_config(),
            defenses=defenses, threat=build_threat(defenses, labels=case.labels, label_method=case.label_method),
            width=victim.width, checkpoint=checkpoint, seed=exp.seed, device=device, activation=victim.activation)
        t0 = time.perf_counter()
        rows = run_single(job, case_dir, overwrite=True)  # its settings changed (or it never finished): redo it
        frame = pd.DataFrame([r.to_row() for r in rows]).assign(case=case.name, paper=case.paper,
                                                                 wall_seconds=time.perf_counter() - t0,
                                                                 overrides=" ".join(f"--set {o}" for o in overrides or []))
        (case_dir / "case.json").write_text(key)
        frames.append(frame)
        log(f"{case.name}: PSNR {frame.psnr_mean.mean():.2f} +- {frame.psnr_mean.std(ddof=0):.2f} dB "
            f"({len(frame)} updates, {frame.wall_seconds.iloc[0]:.0f} s)")
        old = _save(exp, table_md, previous, old, pd.concat(frames, ignore_index=True))  # after every case
    if not frames:
        raise ConfigError(f"no case matches {only}")
    return _save(exp, table_md, previous, old, pd.concat(frames, ignore_index=True))


def same_settings(stored: object, current: object, explicit: object) -> bool:
    """True if a finished case's stored settings equal the current ones. A field the stored settings lack (added to
    the config schema after the case ran) matches when it is at its default now, which by convention reproduces the
    old behaviour; a changed value, including a changed default, does not match. ``explicit`` is the current
    settings without their default-valued fields (``model_dump(exclude_defaults=True)``)."""
    if not isinstance(current, dict) or not isinstance(stored, dict):
        return stored == current
    explicit = explicit if isinstance(explicit, dict) else {}
    if set(stored) - set(current):  # a field that no longer exists: the case ran under another schema
        return False
    for name, value in current.items():
        if name in stored:
            nested = explicit.get(name, {}) if isinstance(value, dict) else explicit.get(name)
            if not same_settings(stored[name], value, nested):
                return False
        elif name in explicit:
            return False
    return True


def _save(exp: Experiment, table_md: Path, table: Path, old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """Merge with earlier rows of other cases, persist, and rewrite the markdown table."""
    merged = new if old is None else pd.concat([old[~old.case.isin(new.case.unique())], new], ignore_index=True)
    merged.to_parquet(table, index=False)
    merged.to_parquet(table_md.with_suffix(".rows.parquet"), index=False)
    table_md.write_text(markdown(exp, merged))
    return merged


def distinct_label_order(indices: list[int], labels: np.ndarray, batch_size: int) -> list[int]:
    """Regroup ``indices`` so every consecutive batch has distinct labels: each batch takes, in order, the next
    unused images whose label it does not have yet (images that fit no batch are dropped)."""
    pool, out = list(indices), []
    while len(pool) >= batch_size:
        batch: list[int] = []
        for i in list(pool):
            if labels[i] not in {labels[j] for j in batch}:
                batch.append(i)
                pool.remove(i)
                if len(batch) == batch_size:
                    break
        if len(batch) < batch_size:
            break
        out += batch
    return out


def markdown(exp: Experiment, frame: pd.DataFrame) -> str:
    order = [c.name for c in exp.cases if c.name in set(frame.case)]
    lines = [f"# {exp.title}", "", f"Images: {exp.dataset} {exp.split} {exp.indices} (N per case below). "
             f"Regenerate: `fedsim experiment experiments/{exp.name}.toml`.", ""]
    if exp.notes:
        lines += [exp.notes.strip(), ""]
    lines += ["| case | N | PSNR (dB) | best-in-batch PSNR | SSIM | label acc | update L2 | update cos. dist. | "
              "sign agree | s / update | paper PSNR |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        f = frame[(frame.case == name)]
        ok = f[f.status == "ok"]
        paper = f.paper.iloc[0] if len(f) else ""

        def ms(col):
            v = ok[col].to_numpy(dtype=float)
            return f"{np.nanmean(v):.2f} ± {np.nanstd(v):.2f}" if len(v) else "n/a"

        lines.append(f"| {name} | {len(ok)}{'' if len(ok) == len(f) else f' ({len(f) - len(ok)} failed)'} | "
                     f"{ms('psnr_mean')} | {ms('psnr_best')} | {ms('ssim_mean')} | {ok.label_accuracy.mean():.2f} | "
                     f"{ok.update_l2.mean():.3g} | {ok.update_cosine_distance.mean():.3g} | {ok.update_sign_agreement.mean():.3f} | "
                     f"{ok.attack_seconds.mean():.1f} | {paper} |")
    runs = frame.drop_duplicates("case").set_index("case")["overrides"] if "overrides" in frame else {}
    commands: dict[str, list[str]] = {}
    for name in order:
        cmd = runs.get(name, "")
        commands.setdefault(cmd if isinstance(cmd, str) else "", []).append(name)
    lines += ["", "Run as:"] + [f"- `fedsim experiment experiments/{exp.name}.toml{' ' + cmd if cmd else ''}`: "
                                 + ", ".join(names) for cmd, names in commands.items()]
    victims = [f"- `{k}`: {v.model} (width {v.width})" + (f", trained {v.train.epochs} epochs" if v.train else "")
               for k, v in exp.victims.items()]
    lines += ["", "Victims:", *victims, ""]
    return "\n".join(lines)
