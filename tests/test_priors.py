"""Generative priors: generators, prior checkpoints, the GIAS search spaces and attacks."""

import pathlib
import tempfile

import numpy as np
import pytest
import torch
from torch.func import functional_call

from attacker.engine import InversionProblem, VictimSimulator
from attacker.generators import build_generator, load_prior, save_prior
from attacker.gias import LatentSpace, WeightSpace
from fedsim.contract import build_attack
from fedsim.models import build_model
from fedsim.single import SingleUpdateJob, run_single
from fedsim.training import TrainConfig, step_schedule


def problem(batch=3, P=2):
    sim = VictimSimulator(build_model("lenet_zhu", 10), step_schedule(TrainConfig(batch_size=batch, num_samples=batch)), 0.1)
    targets = {k: torch.zeros(P, *v.shape) for k, v in sim.params.items()}
    return InversionProblem(sim, targets, torch.zeros(P, batch, dtype=torch.long), (3, 32, 32), (0.5,) * 3, (0.25,) * 3)


def test_dcgan_shapes_and_size():
    for size, params in ((32, 1_068_032 + 2 * (256 + 128 + 64)), (64, None)):
        g = build_generator("dcgan", size, 3)
        out = g(torch.randn(5, 100))
        assert out.shape == (5, 3, size, size) and out.abs().max() <= 1
        if params:
            assert sum(p.numel() for p in g.parameters()) == params  # nz 100, ngf 64
    with pytest.raises(ValueError, match="power-of-two"):
        build_generator("dcgan", 48, 3)
    with pytest.raises(ValueError, match="unknown generator 'nope'"):
        build_generator("nope", 32, 3)
    # a user's module named by import path
    g = build_generator("attacker.generators:DCGANGenerator", 32, 3, ngf=8)
    assert g(torch.randn(1, 100)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("copies", ["loop", "stacked", "vmap"])
def test_batched_generator_copies_equal_one_copy_at_a_time(float64, copies):
    """GI-z/w's per-image weight copies, on every execution path: the same images as separate generators."""
    pr = problem()
    g = build_generator("dcgan", 32, 3, ngf=8).double()
    space = WeightSpace(pr, g, per_image=True, copies=copies)
    assert space.mode == copies
    variables = space.init(2, 2, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for k in variables:
        if k.startswith("w:"):
            variables[k] = variables[k] + 0.05 * torch.randn(variables[k].shape, generator=gen, dtype=torch.float64)
    labels = torch.zeros(2, 3, dtype=torch.long)
    batched = space.inputs(variables, labels)  # [P, R, B, C, H, W] through vmap over candidates and copies
    for p in range(2):
        for r in range(2):
            for b in range(3):
                params = {k[2:]: v[p, r, b] for k, v in variables.items() if k.startswith("w:")}
                one = functional_call(space.generator, (params, space.buffers), (variables["z"][p, r, b][None],))
                expected = ((one[0] + 1) / 2 - space.mean) / space.std
                assert torch.allclose(batched[p, r, b], expected, atol=1e-12)
    assert space.prior_distance({k: v[0, 0] for k, v in space.init(2, 2, gen).items()}) == 0


def test_latent_space_decodes_the_same_on_every_path():
    pr = problem()
    space = LatentSpace(pr, build_generator("dcgan", 32, 3, ngf=8))
    variables = space.init(2, 2, torch.Generator().manual_seed(0))
    labels = torch.zeros(2, 3, dtype=torch.long)
    flat = space.inputs(variables, labels)
    x, _ = space.decode({"z": variables["z"][1, 0]}, labels[1])
    assert torch.allclose(flat[1, 0], x, atol=1e-6)
    assert torch.allclose(space.unit_images(variables, labels), (flat * 0.25 + 0.5).clamp(0, 1))


def test_prior_checkpoints_load_with_weights_only_and_are_checked(tmp_path):
    g = build_generator("dcgan", 32, 3, ngf=8, seed=3)
    path = tmp_path / "prior.pt"
    save_prior(path, "dcgan", {"ngf": 8}, 32, 3, g, epochs=1)
    loaded, meta = load_prior(path, 32, 3)
    z = torch.randn(2, 100)
    assert torch.equal(loaded(z), g.eval()(z)) and meta["epochs"] == 1 and meta["params"] == {"ngf": 8}
    with pytest.raises(ValueError, match="makes 3x32x32 images; the victim takes 3x64x64"):
        load_prior(path, 64, 3)
    torch.save({"generator": "dcgan", "state_dict": {}, "evil": object()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_prior(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        load_prior(tmp_path / "missing.pt")


def test_weight_search_beats_pixel_search_at_equal_iterations(cifar_test):
    """An untrained generator's architecture is a prior: GI-w recovers images that IG does not at 300 iterations."""
    psnr = {}
    for spec in ({"name": "inverting_gradients", "iterations": 300},
                 {"name": "gi_w", "iterations": 300, "restarts": 1},
                 {"name": "gi_zw", "iterations": 100, "weight_iterations": 200, "restarts": 2}):
        job = SingleUpdateJob(cifar_test, "lenet_zhu", [1, 3], 1, build_attack(spec), TrainConfig(lr=0.1))
        rows = run_single(job, pathlib.Path(tempfile.mkdtemp()))
        assert all(r.status == "ok" and r.label_accuracy == 1.0 for r in rows), rows[0].error
        psnr[spec["name"]] = np.mean([r.psnr_mean for r in rows])
        if spec["name"] == "gi_zw":
            assert rows[0].iterations == 300  # both stages
    assert psnr["gi_w"] > 16.0 and psnr["gi_w"] > psnr["inverting_gradients"] + 4.0, psnr
    assert psnr["gi_zw"] > psnr["inverting_gradients"], psnr


def test_prior_train_then_attack_with_the_prior(tmp_path, synthetic_npz, monkeypatch):
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from fedsim.cli import app

    root = pathlib.Path(__file__).resolve().parents[1]
    ckpt = tmp_path / "prior.pt"
    trained = subprocess.run([sys.executable, "-m", "fedsim.cli", "prior", "train", "--dataset", str(synthetic_npz),
                              "--epochs", "2", "--ngf", "8", "--ndf", "8", "--batch-size", "32", "--output", str(ckpt)],
                             capture_output=True, text=True, cwd=root, env=dict(os.environ), timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "prior_samples.png").is_file()
    generator, meta = load_prior(ckpt, 32, 3)
    assert meta["epochs"] == 2 and meta["images"] == 120 and np.isfinite(meta["final_g_loss"])
    assert generator(torch.randn(2, 100)).shape == (2, 3, 32, 32)

    # the attacks and the bad priors through the same command line, in this process (no second interpreter start)
    monkeypatch.chdir(root)

    def fedsim(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    out = tmp_path / "attack"
    common = ["--prior", ckpt, "--dataset", synthetic_npz, "--indices", "0-1", "--iterations", "5"]
    for attack, extra in (("gi_z", []), ("gi_zw", ["--param", "weight_iterations=5"])):
        result = fedsim("attack", "--attack", attack, *common, *extra, "--output", out / attack)
        assert result.exit_code == 0, result.output
        assert (pd_read(out / attack).status == "ok").all()
    # bad priors are one line each, before any work
    np.savez(tmp_path / "big.npz", images=np.zeros((4, 64, 64, 3), np.uint8), labels=np.arange(4))
    for args, expected in ((["--prior", tmp_path / "nope.pt"], "prior checkpoint not found"),
                           (["--prior", synthetic_npz], "weights_only"),
                           (["--prior", ckpt, "--dataset", tmp_path / "big.npz", "--indices", "0-1"],
                            "victim takes 3x64x64")):
        bad = fedsim("attack", "--attack", "gi_z", "--dataset", synthetic_npz, "--output", tmp_path / "b", *args)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and expected in lines[0], bad.stderr


def pd_read(folder):
    import pandas as pd

    return pd.read_parquet(folder / "leakage.parquet")


def test_cinet_width_rule_matches_the_reference_over_parameterisation():
    from attacker.generators import CINetGenerator, cinet_width

    def count(width, size=32):
        return sum(p.numel() for p in CINetGenerator(size, 3, 128, width).parameters())

    assert count(32) == 140_227  # transposed conv to 4x4 + 4 blocks of two 3x3 convolutions at width 32 + to-RGB
    for batch, size, factor in ((1, 32, 4.0), (64, 32, 4.0), (16, 32, 40.0), (4, 64, 4.0)):
        width = cinet_width(batch, size, factor=factor)
        bound = factor * batch * size * size
        assert count(width, size) > bound  # over-parameterised ...
        assert width == 32 or count(width // 2, size) <= bound  # ... by the first doubling that exceeds the bound
    assert cinet_width(64, 32) == 64 and cinet_width(16, 32, factor=40.0) == 128


def test_cinet_recovers_a_batch_from_a_sigmoid_victim(cifar_test):
    from fedsim.config import build_threat

    results = {}
    for name in ("ci_net", "inverting_gradients"):
        job = SingleUpdateJob(cifar_test, "cnn2", [0, 1], 2, build_attack({"name": name, "iterations": 100}),
                              TrainConfig(lr=0.1, batch_size=2, num_samples=2), threat=build_threat([], labels="known"),
                              activation="sigmoid")
        (row,) = run_single(job, pathlib.Path(tempfile.mkdtemp()))
        assert row.status == "ok", row.error
        results[name] = row
    assert results["ci_net"].psnr_mean > 25.0 and results["ci_net"].ssim_mean > 0.85, results["ci_net"]
    assert results["ci_net"].psnr_mean > results["inverting_gradients"].psnr_mean + 8.0


def test_generator_attacks_take_bn_fidelity_masked_matching_fedavg_and_any_victim(cifar_test):
    from fedsim.config import build_threat
    from fedsim.defenses import build_defense

    defenses = [build_defense({"name": "share_bn_stats"}), build_defense({"name": "topk", "fraction": 0.3})]
    fedavg = TrainConfig(mode="fedavg", lr=0.05, epochs=1, batch_size=1, num_samples=2)
    for model, spec in (("convnet", {"name": "gi_zw", "iterations": 3, "weight_iterations": 3, "restarts": 2}),
                        ("convnet", {"name": "gi_z", "iterations": 3, "restarts": 2}),
                        ("resnet18", {"name": "gi_w", "iterations": 3}),
                        ("convnet", {"name": "ci_net", "iterations": 3})):
        spec = {**spec, "bn": 0.1, "bn_source": "shared", "objective": "masked_cosine", "generator_params":
                {"ngf": 8} if spec["name"] != "ci_net" else {}}
        job = SingleUpdateJob(cifar_test, model, [0, 1, 2, 3], 2, build_attack(spec), fedavg, defenses=defenses,
                              threat=build_threat(defenses), width=4)
        rows = run_single(job, pathlib.Path(tempfile.mkdtemp()))
        assert [r.status for r in rows] == ["ok", "ok"], (model, spec["name"], rows[0].error)
        assert all(np.isfinite(r.psnr_mean) and r.batch_size == 2 for r in rows)
