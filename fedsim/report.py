"""``fedsim report``: one self-contained HTML page for a run or a sweep directory.

Everything is embedded (plots as PNG data URIs drawn with matplotlib, reconstructions as PNGs), so the file can be
mailed, attached to a paper's supplement or opened offline. A run's page shows its leakage per round (mean over
the attacked images with the spread over images, and the best image of each batch), its utility per round (test
accuracy, and epsilon when a DP defense runs), every attacked batch with each reconstruction captioned by its PSNR,
the GIML prior's samples per round when a learnt prior ran, and the resolved config. A sweep's page adds the
privacy-utility picture: leakage against utility (test accuracy) per point, leakage and accuracy along each axis, a
summary table, then each point's own reconstructions.

Reads only what a run writes (``leakage.parquet``, ``rounds.parquet``, ``reconstructions/``, ``attacker/``,
``config.json``; a sweep's ``sweep.json`` and ``points/``), so a report can be rebuilt at any time, also of a run
that is still going.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .results import RunData, load_run, read_table

METRICS = (("psnr", "PSNR (dB)", "higher leaks more"), ("ssim", "SSIM", "higher leaks more"),
           ("lpips", "LPIPS", "lower leaks more"), ("label_accuracy", "label accuracy", "higher leaks more"))
MAX_IMAGES_PER_BATCH = 32  # shown per attacked batch (the rest are in the run's npz files)
SWEEP_IMAGES_PER_POINT = 16  # a sweep point shows this many images of its first attacked round


class ReportError(ValueError):
    """A directory that holds no run or sweep; one line."""


# ------------------------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    return plt


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_uri(array: np.ndarray) -> str:
    """(H, W, C) uint8 -> a PNG data URI."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def file_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def per_round_leakage(run: RunData) -> pd.DataFrame:
    """Per (attack, round): mean and std over attacked images of PSNR/SSIM/LPIPS, the mean of the batches' best
    image, and label accuracy over updates (mean, std). Images are counted once each (a batch of 16 weighs 16)."""
    ok = run.ok()
    if not len(ok):
        return pd.DataFrame()
    images = run.image_scores()
    out = []
    for (attack, rnd), rows in ok.groupby(["attack", "round"], sort=True):
        record: dict[str, Any] = {"attack": attack, "round": int(rnd), "updates": len(rows),
                                  "images": int(rows.batch_size.sum())}
        per_image = images[(images.attack == attack) & (images["round"] == rnd)]
        for metric in ("psnr", "ssim", "lpips"):
            if len(per_image):
                values = per_image[metric].astype(float)
            else:  # a run from before per-image files: each row's batch mean stands for its images
                values = rows[f"{metric}_mean"].astype(float).repeat(rows.batch_size.astype(int).clip(lower=1))
            record[f"{metric}_mean"] = float(values.mean()) if values.notna().any() else math.nan
            record[f"{metric}_std"] = float(values.std(ddof=0)) if values.notna().any() else math.nan
            best = rows[f"{metric}_best"].astype(float)
            record[f"{metric}_best"] = float(best.mean()) if best.notna().any() else math.nan
        labels = rows.label_accuracy.astype(float)
        record["label_accuracy_mean"] = float(labels.mean()) if labels.notna().any() else math.nan
        record["label_accuracy_std"] = float(labels.std(ddof=0)) if labels.notna().any() else math.nan
        record["label_accuracy_best"] = math.nan
        out.append(record)
    return pd.DataFrame(out)


def leakage_figure(run: RunData) -> str | None:
    table = per_round_leakage(run)
    if not len(table):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.1))
    attacks = list(dict.fromkeys(table.attack))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title, direction) in zip(axes, METRICS):
        if table[f"{metric}_mean"].isna().all():
            why = ("not computed: AlexNet's weights\nare not in the torch cache" if metric == "lpips"
                   else "not available")
            _note(ax, why)
            ax.set_title(f"{title}: {direction}", fontsize=9)
            continue
        for i, attack in enumerate(attacks):
            rows = table[table.attack == attack].sort_values("round")
            c = colours[i % len(colours)]
            x, mean, std = rows["round"], rows[f"{metric}_mean"], rows[f"{metric}_std"].fillna(0)
            if len(rows) > 1:  # a band over rounds; a lone round gets an error bar
                ax.plot(x, mean, "o-", color=c, label=f"{attack} (mean ± std)", ms=4)
                ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.18, lw=0)
            else:
                ax.errorbar(x, mean, yerr=std, fmt="o", color=c, capsize=3, ms=4, label=f"{attack} (mean ± std)")
            if rows[f"{metric}_best"].notna().any():
                ax.plot(x, rows[f"{metric}_best"], "^--", color=c, lw=1, ms=3, alpha=0.8,
                        label=f"{attack} (best in batch)")
        ax.set_title(f"{title}: {direction}", fontsize=9)
        ax.set_xlabel("round")
        rounds = sorted(set(table["round"]))
        if len(rounds) <= 12:
            ax.set_xticks(rounds)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        if len(rounds) == 1:
            ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
        if metric == "label_accuracy":
            ax.set_ylim(-0.03, 1.03)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False,
                   bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    return _figure_uri(fig)


def has_epsilon(rounds: pd.DataFrame) -> bool:
    return "epsilon" in rounds and bool(np.isfinite(rounds.epsilon.astype(float)).any())


def utility_figure(run: RunData, size: tuple[float, float] = (6, 3)) -> str | None:
    rounds = run.rounds
    if not len(rounds) or "test_accuracy" not in rounds:
        return None
    plt = _pyplot()
    rounds = rounds.sort_values("round")
    fig, ax = plt.subplots(figsize=size)
    many = len(rounds) > 40
    ax.plot(rounds["round"], rounds.test_accuracy, "o-", ms=2 if many else 3, lw=0.6 if many else 1.5,
            alpha=0.45 if many else 1.0, color="C2", label="test accuracy")
    if many:  # a round's accuracy on a few hundred images is noisy: show the running mean beside it
        window = max(3, len(rounds) // 20)
        ax.plot(rounds["round"], rounds.test_accuracy.rolling(window, min_periods=1).mean(), color="C2", lw=2,
                label=f"running mean over {window} rounds")
        ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy of the global model")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if has_epsilon(rounds):
        twin = ax.twinx()
        eps = rounds.epsilon.astype(float)
        twin.plot(rounds["round"], eps, "s--", ms=3, color="C3", label="epsilon")
        twin.set_ylabel(f"epsilon (delta = {run.config.get('privacy', {}).get('delta', 1e-5):g})")
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        fig.legend(loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    return _figure_uri(fig)


# ------------------------------------------------------------------------------------------------------------
# Sweep directories


@dataclass
class SweepData:
    root: Path
    meta: dict
    columns: list[str]
    summary: pd.DataFrame
    rounds: pd.DataFrame
    points: list[tuple[str, dict, RunData]] = field(default_factory=list)  # (directory name, point.json, run)

    @property
    def name(self) -> str:
        return str(self.meta.get("spec", {}).get("name") or self.root.name)


def load_sweep_dir(root: Path) -> SweepData:
    from .sweep import summarise

    meta = json.loads((root / "sweep.json").read_text())
    columns = list(meta.get("columns", []))
    points = []
    for name in meta.get("points", []):
        directory = root / "points" / name
        try:
            state = json.loads((directory / "point.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        points.append((name, state, load_run(directory)))
    leakage = read_table(root / "leakage.parquet")
    rounds = read_table(root / "rounds.parquet")
    images = [run.image_scores().assign(point=name) for name, state, run in points if state.get("status") == "done"]
    images = pd.concat(images, ignore_index=True) if images else None
    # summarised here, not read from summary.parquet: the page always agrees with the rows it shows
    summary = summarise(leakage, rounds, ["point", *columns], images) if len(leakage) else pd.DataFrame()
    return SweepData(root, meta, columns, summary, rounds, points)


def _axis_order(sweep: SweepData, column: str) -> list:
    """An axis's values in the sweep file's order."""
    for axis in sweep.meta.get("spec", {}).get("axes", []):
        if axis.get("key") == column:
            return [_hashable(v) for v in axis.get("values") or []]
        if axis.get("name") == column:
            return [p["label"] for p in axis.get("points") or []]
    return []


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def privacy_utility_figure(sweep: SweepData) -> str | None:
    """Leakage (mean PSNR over every attacked image of a point) against the point's utility, one
    panel per attack; colour is the axis with the fewest values, labels the others (with epsilon where DP runs)."""
    from matplotlib.ticker import MaxNLocator

    summary = sweep.summary
    if not len(summary) or "utility" not in summary:
        return None
    plt = _pyplot()
    attacks = list(dict.fromkeys(summary.attack))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 4), squeeze=False)
    colour_axis = min(reversed(sweep.columns), key=lambda c: summary[c].nunique())
    label_axes = [c for c in sweep.columns if c != colour_axis]
    order = _axis_order(sweep, colour_axis) or list(dict.fromkeys(summary[colour_axis]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, attack in zip(axes[0], attacks):
        rows = summary[summary.attack == attack]
        for j, value in enumerate(order):
            sel = rows[rows[colour_axis] == value]
            if not len(sel):
                continue
            ax.scatter(sel.utility, sel.psnr_mean, color=colours[j % len(colours)], s=28,
                       label=f"{colour_axis} = {_value_text(value)}", zorder=3)
            for r in sel.itertuples(index=False):
                r = r._asdict()
                text = ", ".join(_value_text(r[c]) for c in label_axes if c in r)
                eps = r.get("epsilon", math.nan)
                if isinstance(eps, float) and math.isfinite(eps):
                    text += f" (ε={eps:.3g})"
                ax.annotate(text, (r["utility"], r["psnr_mean"]), fontsize=6.5, xytext=(3, 3),
                            textcoords="offset points", color="0.25")
        ax.set_title(attack)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel("utility: test accuracy, mean over the last tenth of the rounds")
        ax.set_ylabel("PSNR, mean over attacked images (leakage, dB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.06))
    fig.tight_layout()
    return _figure_uri(fig)


def axis_figures(sweep: SweepData) -> list[tuple[str, str]]:
    """Per axis: leakage (mean PSNR with the spread over images) along the axis' values, one line per
    combination of the other axes, beside the utility on the right-hand scale."""
    summary = sweep.summary
    if not len(summary):
        return []
    plt = _pyplot()
    out = []
    attacks = list(dict.fromkeys(summary.attack))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column in sweep.columns:
        order = _axis_order(sweep, column) or list(dict.fromkeys(summary[column]))
        position = {v: i for i, v in enumerate(order)}
        others = [c for c in sweep.columns if c != column]
        width = max(4.6, 0.55 * len(order) + 2.5)
        across = width * len(attacks) <= 15  # attacks side by side, or one above the other for long axes
        shape = (1, len(attacks)) if across else (len(attacks), 1)
        fig, axes = plt.subplots(*shape, figsize=(width * shape[1], 3.4 * shape[0]), squeeze=False)
        for ax, attack in zip(axes.flat, attacks):
            rows = summary[summary.attack == attack]
            twin = ax.twinx() if "utility" in rows else None
            groups = rows.groupby(others, sort=False) if others else [((), rows)]
            for j, (key, sel) in enumerate(groups):
                key = key if isinstance(key, tuple) else (key,)
                sel = sel.assign(_x=sel[column].map(position)).dropna(subset=["_x"]).sort_values("_x")
                c = colours[j % len(colours)]
                name = ", ".join(f"{o}={_value_text(k)}" for o, k in zip(others, key)) or "leakage"
                spread = sel["psnr_image_std"] if "psnr_image_std" in sel else sel["psnr_mean_std"]
                ax.errorbar(sel._x, sel.psnr_mean, yerr=spread.fillna(0), fmt="o-", color=c, ms=4, capsize=2,
                            label=name)
                if twin is not None:
                    twin.plot(sel._x, sel.utility, "x:", color=c, alpha=0.8)
            ax.set_xticks(range(len(order)), [_value_text(v) for v in order], rotation=30, ha="right")
            ax.set_xlabel(column)
            ax.set_ylabel("PSNR (dB), mean ± std over images")
            ax.set_title(attack)
            if twin is not None:
                twin.ticklabel_format(axis="y", useOffset=False)
                twin.set_ylabel("utility (dotted)")
                twin.grid(False)
                twin.spines["right"].set_visible(True)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False, fontsize=8,
                       bbox_to_anchor=(0.5, -0.02 - 0.04 / shape[0]))
        fig.tight_layout()
        out.append((column, _figure_uri(fig)))
    return out


# ------------------------------------------------------------------------------------------------------------
# Page sections


def _format(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def run_summary_table(run: RunData) -> list[list[str]]:
    rows = [["attack", "updates", "images", "PSNR mean ± std", "PSNR best", "SSIM", "LPIPS", "label acc",
             "seconds per update", "errors"]]
    if not len(run.leakage):
        return rows
    images = run.image_scores()
    for attack, group in run.leakage.groupby("attack", sort=False):
        ok = group[group.status == "ok"]
        per_image = images[images.attack == attack]
        psnr = per_image.psnr if len(per_image) else ok.psnr_mean.repeat(ok.batch_size.clip(lower=1))
        ssim = per_image.ssim if len(per_image) else ok.ssim_mean
        lpips = per_image.lpips if len(per_image) else ok.lpips_mean
        rows.append([attack, str(len(ok)), str(int(ok.batch_size.sum())),
                     f"{_format(psnr.mean())} ± {_format(psnr.std(ddof=0))}" if len(psnr) else "–",
                     _format(ok.psnr_best.mean()), _format(ssim.mean(), 3), _format(lpips.mean(), 3),
                     _format(ok.label_accuracy.mean(), 3), _format(ok.attack_seconds.mean(), 1),
                     str(int((group.status == "error").sum()))])
    return rows


def audit_facts(c: dict) -> list[tuple[str, str]]:
    """An audited Flower app's run (``fedsim.audit``): what the audit file declared."""
    recipe, data, threat = c.get("recipe", {}), c.get("data", {}), c.get("threat", {})
    rc = c.get("run_config", {})
    privacy = rc.get("privacy")
    return [("app", f"a Flower app audited by {c.get('audit_file')} (Flower run {c.get('run_id')})"),
            ("model", f"{c.get('model')}" + (f" {c['model_args']}" if c.get("model_args") else "")),
            ("data", f"recorded by the clients; inputs {data.get('shape')} normalised with mean {data.get('mean')}, "
                     f"std {data.get('std')}"),
            ("recipe", ", ".join(f"{k} {v}" for k, v in recipe.items() if k in ("mode", "lr", "local_epochs",
                                                                                  "batch_size", "optimizer"))),
            *([("privacy", f"run config privacy = {privacy}")] if privacy else []),
            ("attacks", ", ".join(_spec_text(a, keep=("iterations", "restarts", "prior"))
                                  for a in c.get("attacks", [])) or "none"),
            ("attacked", f"{c.get('attacked_per_round')} replies per round"
                         + (f", rounds {c['rounds']}" if c.get("rounds") else "")),
            ("threat model", f"labels {threat.get('labels')}")]


def run_facts(run: RunData) -> list[tuple[str, str]]:
    c = run.config
    if not c:
        return []
    if c.get("command") == "fedsim audit":
        return audit_facts(c) + utility_facts(run, "the app's evaluate_fn")
    fed, client, data, model, threat = (c.get(k, {}) for k in ("federation", "client", "data", "model", "threat"))
    defenses = ", ".join(_spec_text(d) for d in c.get("defenses", [])) or "none"
    attacks = ", ".join(_spec_text(a, keep=("iterations", "restarts", "prior")) for a in c.get("attacks", []))
    if fed:
        data_text = f"{data.get('dataset')} ({data.get('partition')} partition)"
    else:  # fedsim attack: chosen images, no federation
        data_text = f"{data.get('dataset')}, images {_index_text(data.get('indices', []))} in batches of " \
                    f"{data.get('batch_size')}"
    facts = [("data", data_text),
             ("victim", f"{model.get('name')}" + (f" from {model['checkpoint']}" if model.get("checkpoint") else
                                                 " (untrained)"))]
    if fed:
        facts.append(("federation", f"{fed.get('num_clients')} clients, {fed.get('clients_per_round')} per round, "
                                    f"{fed.get('rounds')} rounds ({fed.get('sampling', 'fixed')} sampling)"))
    facts += [("client", f"{client.get('mode')}, lr {client.get('lr')}, batch {client.get('batch_size')}"
                         + (f", {client.get('epochs')} epochs" if client.get("mode") == "fedavg" else "")),
              ("defenses", defenses), ("attacks", attacks or "none"),
              ("threat model", f"labels {threat.get('labels')}"
                               + (", secure aggregation" if threat.get("secure_aggregation") else ""))]
    if fed:
        facts.append(("attacked", f"{c.get('attack', {}).get('clients_per_round')} clients per round"
                                  + (f", rounds {c['attack']['rounds']}" if c.get("attack", {}).get("rounds")
                                     else "")))
    if has_epsilon(run.rounds):
        last = run.rounds.sort_values("round").iloc[-1]
        facts.append(("privacy", f"ε = {float(last.epsilon):.3g} after round {int(last['round'])} "
                                 f"(δ = {c.get('privacy', {}).get('delta', 1e-5):g}, Opacus RDP accountant)"))
    return facts + utility_facts(run)


def utility_facts(run: RunData, source: str | None = None) -> list[tuple[str, str]]:
    """The global model's test accuracy from round 0 to the last (``source``: where it comes from; default: the
    mean over the last tenth of the rounds too)."""
    if not len(run.rounds):
        return []
    from .sweep import utility

    r = run.rounds.sort_values("round")
    text = (f"test accuracy {float(r.test_accuracy.iloc[0]):.3f} (round 0) → "
            f"{float(r.test_accuracy.iloc[-1]):.3f} (round {int(r['round'].iloc[-1])})")
    text += f", {source}" if source else f"; {utility(r):.3f} mean over the last tenth of the rounds"
    return [("utility", text)]


def _index_text(indices: list[int]) -> str:
    if indices and list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}-{indices[-1]}"
    return ",".join(map(str, indices))


def _spec_text(spec: dict, keep: tuple[str, ...] | None = None) -> str:
    params = {k: v for k, v in spec.items() if k != "name" and v is not None and (keep is None or k in keep)}
    return spec.get("name", "?") + (" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")


@dataclass
class Cell:
    uri: str
    caption: str
    title: str = ""


@dataclass
class BatchView:
    """One attacked update: ground truth, then one row per attack, each image captioned."""

    title: str
    rows: list[tuple[str, list[Cell]]]
    note: str = ""


def strip_view(run: RunData, keys: list[tuple[int, int]], attacks: list[str], limit: int, title: str
               ) -> BatchView | None:
    """The attacked images of ``keys`` ((round, client) pairs) side by side: ground truth, then one row per attack
    (a blank where an attack has no kept batch), at most ``limit`` images."""
    truth: list[Cell] = []
    rows: dict[str, list[Cell]] = {a: [] for a in attacks}
    total = 0
    for rnd, client in keys:
        batches = {a: run.batch(rnd, client, a) for a in attacks}
        first = next((b for b in batches.values() if b is not None), None)
        if first is None:
            continue
        total += len(first.psnr)
        n = min(len(first.psnr), limit - len(truth))
        who = f"client {client}, " if len(keys) > 1 else ""
        labels = first.true_labels if len(first.true_labels) == len(first.psnr) else None
        truth += [Cell(image_uri(first.ground_truth[i]), f"{who}label {labels[i]}" if labels is not None else who)
                  for i in range(n)]
        for attack, b in batches.items():
            rows[attack] += [Cell("", "no result") for _ in range(n)] if b is None else [
                Cell(image_uri(b.reconstruction[i]), f"{b.psnr[i]:.1f} dB",
                     f"PSNR {b.psnr[i]:.2f} dB, SSIM {b.ssim[i]:.3f}"
                     + (f", LPIPS {b.lpips[i]:.3f}" if np.isfinite(b.lpips[i]) else ""))
                for i in range(n)]
    if not truth:
        return None
    note = f"first {len(truth)} of {total} images shown" if total > len(truth) else ""
    return BatchView(title, [("ground truth", truth), *rows.items()], note)


def batch_views(run: RunData) -> list[BatchView]:
    """Every attacked update of a run, one view each."""
    ok = run.ok()
    views = []
    for (rnd, client), rows in ok.groupby(["round", "client_id"], sort=True) if len(ok) else []:
        who = "the aggregate (secure aggregation)" if client == -1 else f"client {int(client)}"
        view = strip_view(run, [(int(rnd), int(client))], list(rows.attack), MAX_IMAGES_PER_BATCH,
                          f"round {int(rnd)}, {who}")
        if view is not None:
            views.append(view)
    return views


def round_view(run: RunData, rnd: int, limit: int) -> BatchView | None:
    """The attacked clients of one round side by side (a sweep point's reconstructions)."""
    ok = run.ok()
    rows = ok[ok["round"] == rnd]
    clients = sorted({int(c) for c in rows.client_id})
    who = f"clients {', '.join(map(str, clients))}" if len(clients) > 1 else f"client {clients[0]}" if clients else ""
    return strip_view(run, [(rnd, c) for c in clients], list(dict.fromkeys(rows.attack)), limit,
                      f"round {rnd}, {who}")


def prior_views(run: RunData, limit: int = 12) -> list[Cell]:
    samples = run.prior_samples
    if len(samples) > limit:  # evenly spaced, always the first and the last
        keep = sorted(set(np.linspace(0, len(samples) - 1, limit).round().astype(int)))
        samples = [samples[i] for i in keep]
    return [Cell(file_uri(path), f"after round {rnd}") for rnd, path in samples]


# ------------------------------------------------------------------------------------------------------------
# HTML


def _template():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("fedsim", "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _format
    return env.get_template("report.html")


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def config_text(config: dict) -> str:
    """The resolved config as TOML (the format it is written in; keys whose value is unset are left out)."""
    import tomli_w

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v if x is not None]
        return v

    try:
        return tomli_w.dumps(clean(config))
    except (TypeError, ValueError):
        return _json_text(config)


def run_context(run: RunData) -> dict:
    return {"facts": run_facts(run), "summary": run_summary_table(run), "leakage_plot": leakage_figure(run),
            "utility_plot": utility_figure(run), "batches": batch_views(run), "prior": prior_views(run),
            "failures": run.failures.to_dict("records") if len(run.failures) else [],
            "errors": run.leakage[run.leakage.status == "error"].reindex(columns=["round", "client_id", "attack",
                                                                               "error"]).to_dict("records")
            if len(run.leakage) else [],
            "config": config_text(run.config)}


def sweep_summary_table(sweep: SweepData) -> list[list[str]]:
    s = sweep.summary
    head = [*sweep.columns, "attack", "images", "PSNR", "PSNR best", "SSIM", "LPIPS", "label acc",
            "test acc (last round)", "utility", "ε"]
    rows = [head]
    if not len(s):
        return rows
    for r in s.to_dict("records"):
        spread = r.get("psnr_image_std", r.get("psnr_mean_std", math.nan))
        rows.append([*(_value_text(r[c]) for c in sweep.columns), r["attack"], str(int(r["images"])),
                     f"{_format(r['psnr_mean'])} ± {_format(spread)}", _format(r["psnr_best"]),
                     _format(r["ssim_mean"], 3), _format(r["lpips_mean"], 3), _format(r["label_accuracy"], 3),
                     _format(r.get("test_accuracy"), 3), _format(r.get("utility"), 3),
                     _format(r.get("epsilon"), 3)])
    return rows


def sweep_context(sweep: SweepData) -> dict:
    points = []
    for name, state, run in sweep.points:
        status = state.get("status", "not started")
        values = state.get("values") or sweep.meta.get("values", {}).get(name, {})
        label = ", ".join(f"{k} = {_value_text(v)}" for k, v in values.items()) or name
        attacked = sorted({int(r) for r in run.ok()["round"]}) if len(run.ok()) else []
        points.append({"name": name, "label": label, "status": status, "error": state.get("error", ""),
                       "facts": run_facts(run), "summary": run_summary_table(run),
                       "batches": [v for v in [round_view(run, attacked[0], SWEEP_IMAGES_PER_POINT)] if v]
                       if attacked else [],
                       "leakage_plot": leakage_figure(run) if len(attacked) > 1 else None,
                       "utility_plot": utility_figure(run, size=(5, 2.2))})
    spec = sweep.meta.get("spec", {})
    base = Path(sweep.meta.get("base", ""))
    try:
        base_text = base.read_text()
    except OSError:
        base_text = ""
    done = sum(p["status"] == "done" for p in points)
    return {"columns": sweep.columns, "summary": sweep_summary_table(sweep),
            "privacy_utility": privacy_utility_figure(sweep), "axis_plots": axis_figures(sweep),
            "points": points, "done": done, "total": len(points), "spec": config_text(spec),
            "base_name": base.name, "base_text": base_text}


def build_report(path: Path, output: Path | None = None) -> Path:
    """Write the HTML report of a run or sweep directory; returns its path (default ``<dir>/report.html``)."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"not a directory: {path}")
    if (path / "sweep.json").is_file():
        sweep = load_sweep_dir(path)
        kind, title, context = "sweep", sweep.name, sweep_context(sweep)
    elif any((path / f).is_file() for f in ("leakage.parquet", "rounds.parquet")):
        run = load_run(path)
        kind, title, context = "run", run.name, run_context(run)
    else:
        raise ReportError(f"{path} holds no run (leakage.parquet, rounds.parquet) and no sweep (sweep.json)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        fedsim_version = version("fedsim")
    except PackageNotFoundError:
        fedsim_version = "unknown"
    page = _template().render(kind=kind, title=title, source=str(path.resolve()), version=fedsim_version,
                              created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **context)
    output = Path(output) if output else path / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    return output


