"""Tables of experiments/defense_sweep.toml: leakage per attack, defense and batch size beside the utility it costs.

    fedsim sweep experiments/defense_sweep.toml
    fedsim sweep experiments/defense_sweep_seeds.toml       # the attacks' own spread, batch 1
    fedsim sweep experiments/defense_sweep_seeds_b4.toml    # and GI-z/w's at batch 4
    python experiments/defense_sweep.py

writes experiments/defense_sweep.tables.md (the tables, monotonicity checks and seed spreads, regenerated), copies
the sweep's HTML report (rebuilt) to experiments/defense_sweep_report.html, its summary to
experiments/defense_sweep.summary.parquet and its per-image scores to experiments/defense_sweep.images.parquet.
The findings in experiments/defense_sweep.md are written by hand from these tables.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
NOISE = ["none", "noise 1e-4", "noise 1e-3", "noise 1e-2", "noise 1e-1"]
TOPK = ["none", "top-k 10%", "top-k 1%"]
DP = ["none", "DP eps 50", "DP eps 8", "DP eps 1"]
ATTACKS = {"inverting_gradients": "IG", "gradinversion": "GradInversion", "gi_zw": "GI-z/w"}


def cell(frame: pd.DataFrame, batch: str, defense: str, attack: str, column: str) -> float:
    rows = frame[(frame.batch == batch) & (frame.defense == defense) & (frame.attack == attack)]
    return float(rows[column].iloc[0]) if len(rows) else float("nan")


def leakage_table(summary: pd.DataFrame, defenses: list[str], batches: list[str]) -> list[str]:
    head = "| defense | " + " | ".join(f"{ATTACKS[a]} b{b}" for b in batches for a in ATTACKS) + \
           " | " + " | ".join(f"utility b{b}" for b in batches) + " | ε |"
    lines = [head, "|" + "---|" * (2 + len(batches) * (len(ATTACKS) + 1))]
    for d in defenses:
        cells = []
        for b in batches:
            for a in ATTACKS:
                mean, std = cell(summary, b, d, a, "psnr_mean"), cell(summary, b, d, a, "psnr_image_std")
                cells.append(f"{mean:.2f} ± {std:.2f}" if mean == mean else "–")
        accs = [f"{cell(summary, b, d, next(iter(ATTACKS)), 'utility'):.3f}" for b in batches]
        eps = cell(summary, batches[0], d, next(iter(ATTACKS)), "epsilon")
        lines.append(f"| {d} | " + " | ".join(cells) + " | " + " | ".join(accs) +
                     f" | {eps:.3g} |".replace("nan", "–"))
    return lines


def paired_step(images: pd.DataFrame, batch: str, attack: str, before: str, after: str) -> tuple[float, float]:
    """Mean and standard error over images of PSNR(after) - PSNR(before): the same images in both points."""
    def psnr(defense):
        rows = images[(images.batch == batch) & (images.attack == attack) & (images.defense == defense)]
        return rows.set_index(["round", "client_id", "image"]).psnr

    diff = (psnr(after) - psnr(before)).dropna()
    return float(diff.mean()), float(diff.std(ddof=1) / len(diff) ** 0.5) if len(diff) > 1 else float("nan")


def monotone(summary: pd.DataFrame, images: pd.DataFrame, order: list[str], batches: list[str]) -> list[str]:
    """Does the mean PSNR fall at every step along ``order`` (per attack and batch size)? A rise is set against
    its paired standard error over the images."""
    lines = []
    for b in batches:
        for a in ATTACKS:
            values = [cell(summary, b, d, a, "psnr_mean") for d in order]
            rises = []
            for before, after, x, y in zip(order, order[1:], values, values[1:]):
                if y > x:
                    mean, se = paired_step(images, b, a, before, after)
                    rises.append(f"{before} → {after}: +{mean:.2f} ± {se:.2f} dB paired "
                                 f"({'within' if mean < 2 * se else 'beyond'} 2 standard errors)")
            verdict = "falls at every step" if not rises else "rises at " + "; ".join(rises)
            lines.append(f"- batch {b}, {ATTACKS[a]}: " + " → ".join(f"{v:.2f}" for v in values) + f" ({verdict})")
    return lines


SEED_SWEEPS = {  # file: (batch size, defenses in order); each attacks round 1 of the main sweep's federation
    "defense_sweep_seeds.toml": ("1", ["none", "noise 1e-4"]),
    "defense_sweep_seeds_b4.toml": ("4", ["none", "noise 1e-4", "noise 1e-3"]),
}


def seed_spread(summary: pd.DataFrame) -> list[str]:
    """The same round-1 updates as the main sweep attacked under three more attacker seeds (``attack.seed`` 1, 2,
    3): with the main sweep's own draw, four draws per (attack, defense). Each step between defenses is paired by
    seed, and set against the seed-to-seed standard deviation."""
    from fedsim.sweep import collect, load_sweep, point_config

    main = load_sweep(HERE / "defense_sweep.toml")
    attacks = {a["name"]: a for a in point_config(main, main.points[0]).attacks}
    lines = []
    for file, (batch, defenses) in SEED_SWEEPS.items():
        seeds = load_sweep(HERE / file)
        if not (seeds.root / "sweep.json").is_file():
            continue
        for attack in point_config(seeds, seeds.points[0]).attacks:  # a restated attack must not drift from the main
            if attack != attacks[attack["name"]]:
                raise SystemExit(f"{file}: {attack['name']} differs from defense_sweep.toml's: {attack}")
        table = collect(seeds)["summary"]
        steps = list(zip(defenses, defenses[1:]))
        lines += [f"## Run-to-run spread of the attacks at batch {batch} (experiments/{file})", "",
                  f"Mean PSNR over the same {int(table.images.iloc[0])} batch-{batch} images of round 1 under four "
                  "attacker seeds (the main sweep's draw and `attack.seed` 1, 2, 3); a step's per-seed differences "
                  "are paired by seed (the main sweep's draw first).", "",
                  "| attack | " + " | ".join(f"{d}: mean ± std over seeds" for d in defenses) + " | " +
                  " | ".join(f"{before} → {after}, per seed" for before, after in steps) + " |",
                  "|---|" + "---|" * (len(defenses) + len(steps))]
        for attack, name in ATTACKS.items():
            if attack not in set(table.attack):
                continue
            draws = {}
            for defense in defenses:
                own = [cell(summary, batch, defense, attack, "psnr_mean")]
                rows = table[(table.defense == defense) & (table.attack == attack)].sort_values("attack.seed")
                draws[defense] = pd.Series(own + list(rows.psnr_mean))
            means = [f"{draws[d].mean():.3f} ± {draws[d].std(ddof=1):.2f}" for d in defenses]
            diffs = []
            for before, after in steps:
                diff = draws[after] - draws[before]
                diffs.append(", ".join(f"{x:+.2f}" for x in diff) +
                             f" (mean {diff.mean():+.3f} ± {diff.std(ddof=1) / len(diff) ** 0.5:.3f})")
            lines.append(f"| {name} | " + " | ".join(means) + " | " + " | ".join(diffs) + " |")
        lines.append("")
    return lines


def main() -> None:
    from fedsim.report import build_report
    from fedsim.sweep import collect, load_sweep

    tables = collect(load_sweep(HERE / "defense_sweep.toml"))  # the tables from every finished point, anew
    summary, images = tables["summary"], tables["images"]
    summary["batch"] = summary.batch.astype(str)
    images["batch"] = images.batch.astype(str)
    batches = [b for b in ("1", "4", "16") if b in set(summary.batch)]
    counts = summary.groupby("batch").images.first().to_dict()
    out = ["# experiments/defense_sweep: tables (generated by experiments/defense_sweep.py)", "",
           "PSNR in dB, mean ± std over the attacked images of round 1 (" +
           ", ".join(f"batch {b}: {counts[b]} images" for b in batches) +
           "); utility is the global model's test accuracy on the 200 held-out images averaged over the last tenth "
           "of the rounds (271-300; one evaluation has a binomial standard error of about 0.03 at 20%, chance is "
           "0.10); ε after the last round at δ = 1e-5.", ""]
    out += leakage_table(summary, list(dict.fromkeys([*NOISE, *TOPK, *DP])), batches)
    out += ["", "## Monotonicity (mean PSNR along each defense family)", ""]
    for name, order in (("noise", NOISE), ("top-k", TOPK), ("client DP", DP)):
        out += [f"### {name}: " + " → ".join(order), "", *monotone(summary, images, order, batches), ""]
    out += seed_spread(summary)
    (HERE / "defense_sweep.tables.md").write_text("\n".join(out) + "\n")
    report = build_report(load_sweep(HERE / "defense_sweep.toml").root)
    shutil.copyfile(report, HERE / "defense_sweep_report.html")
    summary.to_parquet(HERE / "defense_sweep.summary.parquet", index=False)
    images.to_parquet(HERE / "defense_sweep.images.parquet", index=False)
    print("\n".join(out))


if __name__ == "__main__":
    main()
