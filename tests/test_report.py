"""``fedsim report`` of a real run: every picture loads in headless Chromium, captions are the kept scores."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from browser import render
from reference_run import ATTACKED, ROOT, ROUNDS

from fedsim.report import build_report, per_round_leakage
from fedsim.results import load_run, read_batch


@pytest.mark.ray
def test_the_kept_batches_are_the_scored_reconstructions(reference):
    rows = pd.read_parquet(reference / "leakage.parquet")
    files = sorted((reference / "reconstructions").glob("*.npz"))
    assert len(files) == len(rows) == ROUNDS * ATTACKED
    for path in files:
        batch = read_batch(path)
        row = rows[(rows["round"] == batch.round) & (rows.client_id == batch.client_id)
                   & (rows.attack == batch.attack)].iloc[0]
        # the row's numbers are the batch's per-image scores, summarised
        assert batch.psnr.mean() == pytest.approx(row.psnr_mean, abs=1e-4)
        assert batch.psnr.max() == pytest.approx(row.psnr_best, abs=1e-4)
        assert batch.ssim.mean() == pytest.approx(row.ssim_mean, abs=1e-5)
        # image i is matched to ground truth i: PSNR recomputed from the stored 8-bit pixels agrees
        mse = ((batch.reconstruction / 255.0 - batch.ground_truth / 255.0) ** 2).reshape(len(batch.psnr), -1).mean(1)
        assert np.allclose(10 * np.log10(1 / mse), batch.psnr, atol=0.05)
        assert (batch.recovered_labels == batch.true_labels).mean() == pytest.approx(row.label_accuracy)


@pytest.mark.ray
def test_a_run_report_renders_with_every_image_loaded(reference, browser, artifacts, tmp_path):
    page = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "fedsim.cli", "report", str(reference), "-o", str(page)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shown = render(browser, page, artifacts / "run_report.png")
    assert shown.images and all(i["width"] > 0 and i["height"] > 0 for i in shown.images), \
        [i["alt"] for i in shown.images if i["width"] == 0]
    # self-contained: nothing but the page itself and its data URIs was requested
    assert [u for u in shown.requests if not u.startswith("data:")] == [page.resolve().as_uri()]
    alts = [i["alt"] for i in shown.images]
    assert "leakage per round" in alts and "test accuracy per round" in alts
    # one ground-truth strip and one reconstruction strip per attacked update, each image captioned with its PSNR
    rows = pd.read_parquet(reference / "leakage.parquet")
    assert sum(a.startswith("ground truth") for a in alts) == int(rows.batch_size.sum())
    expected = []
    for r in rows.sort_values(["round", "client_id"]).itertuples():
        batch = read_batch(reference / "reconstructions" / f"r{r.round:03d}_c{r.client_id}_{r.attack}.npz")
        expected.append([f"{v:.1f} dB" for v in batch.psnr])
    assert [c for c in shown.captions if c.endswith(" dB")] == [c for e in expected for c in e]
    # the summary row: mean and spread over every attacked image
    table = per_round_leakage(load_run(reference))
    assert sorted(table["round"]) == list(range(1, ROUNDS + 1))
    assert (table.images == ATTACKED).all()
    assert "Resolved config" in shown.text and 'name = "reference"' in shown.text


def test_per_round_leakage_weighs_images_not_updates(tmp_path):
    """Two updates of one round, batch 1 and batch 3: the round's mean is over the four images."""
    import torch

    from fedsim.results import batch_file_name, save_batch

    rows = []
    for client, psnrs in ((0, [10.0]), (1, [20.0, 22.0, 24.0])):
        n = len(psnrs)
        save_batch(tmp_path / "reconstructions" / batch_file_name(1, client, "ig"), torch.zeros(n, 3, 4, 4),
                   torch.zeros(n, 3, 4, 4), psnr=np.array(psnrs), ssim=np.full(n, 0.5), lpips=np.full(n, np.nan),
                   true_labels=np.zeros(n), recovered_labels=np.zeros(n))
        rows.append(dict(round=1, client_id=client, attack="ig", batch_size=n, psnr_mean=np.mean(psnrs),
                         psnr_best=max(psnrs), ssim_mean=0.5, ssim_best=0.5, lpips_mean=math.nan,
                         lpips_best=math.nan, label_accuracy=1.0, status="ok", attack_seconds=1.0))
    pd.DataFrame(rows).to_parquet(tmp_path / "leakage.parquet")
    table = per_round_leakage(load_run(tmp_path))
    assert table.psnr_mean.item() == pytest.approx(19.0)
    assert table.psnr_std.item() == pytest.approx(np.std([10, 20, 22, 24]))
    assert table.psnr_best.item() == pytest.approx(17.0)  # mean of the batches' best images
    assert math.isnan(table.lpips_mean.item())
    page = build_report(tmp_path).read_text()
    assert page.count('alt="ground truth') == 4 and page.count('alt="ig ') == 4
    assert ">24.0 dB<" in page and ">10.0 dB<" in page


def test_utility_is_the_mean_accuracy_over_the_last_tenth_of_the_rounds():
    from fedsim.sweep import utility

    rounds = pd.DataFrame({"round": range(31), "test_accuracy": [0.0] * 28 + [0.3, 0.4, 0.5]})
    assert utility(rounds) == pytest.approx(0.4)  # rounds 28-30 of 30 (round 0 is the untrained model)
    assert utility(rounds[rounds["round"] <= 5]) == pytest.approx(0.0)  # at least the last round
    assert math.isnan(utility(rounds[rounds["round"] == 0]))
