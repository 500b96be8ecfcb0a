"""On a machine with a CUDA GPU: attacks there agree with the CPU, attacker actors are given GPUs through Ray's
resources, and the generator copies take their stacked path (the one ``copies = "auto"`` picks off the CPU).
Everywhere else each test is skipped with the reason."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here")]


def test_an_attack_on_cuda_reaches_the_cpu_psnr(cifar_test, tmp_path):
    from attacker.attacks import build_attack
    from fedsim.single import SingleUpdateJob, run_single
    from fedsim.training import TrainConfig

    psnr = {}
    for device in ("cpu", "cuda"):
        job = SingleUpdateJob(cifar_test, "lenet_zhu", [0, 8], 1,
                              build_attack({"name": "inverting_gradients", "iterations": 300, "restarts": 2}),
                              TrainConfig(lr=0.1), device=device)
        psnr[device] = np.array([r.psnr_mean for r in run_single(job, tmp_path / device)])
    # the same draws and steps; float kernels differ, so the path may drift, not the quality
    assert np.abs(psnr["cuda"] - psnr["cpu"]).max() < 1.5, psnr
    assert psnr["cuda"].min() > 17.0, psnr


@pytest.mark.ray
def test_attacker_actors_get_gpus_through_ray_resources():
    import tempfile

    import ray

    from fedsim.contract import ThreatModel
    from fedsim.pool import AttackerPool

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=100 * 1024 * 1024, _temp_dir=tempfile.mkdtemp(prefix="fsgpu-"))
    try:
        pool = AttackerPool([{"name": "inverting_gradients", "iterations": 5}], ThreatModel(), lambda *a: None,
                            executor="ray", workers=2, device="cuda", gpus_per_worker=0.5)
        placement = pool.placement()
        assert [p["gpus"] for p in placement] == ["0", "0"]  # two workers share the one GPU, half each
        pool.close()
    finally:
        ray.shutdown()


def test_generator_copies_take_the_stacked_path_on_cuda_and_match_the_loop():
    from attacker.engine import InversionProblem, VictimSimulator
    from attacker.gias import WeightSpace
    from attacker.generators import build_generator
    from fedsim.models import build_model
    from fedsim.training import TrainConfig, step_schedule

    model = build_model("lenet_zhu", 10, image_size=32, seed=0)
    cfg = TrainConfig(lr=0.1, batch_size=2, num_samples=2)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr, "cuda")
    targets = {k: torch.zeros(1, *v.shape) for k, v in sim.params.items()}
    problem = InversionProblem(sim, targets, torch.tensor([[1, 2]]), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    generator = build_generator("dcgan", 32, 3, seed=0, ngf=16)
    auto = WeightSpace(problem, generator, copies="auto").to("cuda")
    loop = WeightSpace(problem, generator, copies="loop").to("cuda")
    assert auto.mode == "stacked"
    variables = {k: v.cuda() for k, v in auto.init_each([11], 2).items()}
    labels = torch.tensor([[1, 2], [1, 2]], device="cuda")
    flat = {k: v.reshape(2, *v.shape[2:]) for k, v in variables.items()}
    x_auto, _ = auto.decode_many(flat, labels)
    x_loop, _ = loop.decode_many(flat, labels)
    torch.testing.assert_close(x_auto, x_loop, rtol=1e-4, atol=1e-4)
