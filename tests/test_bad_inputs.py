"""A corpus of bad inputs across `fedsim run` keys, the other commands' flags, data files, checkpoints and devices:
each must exit 2 with one line naming the offending key or value, before any work starts (Ray is never started),
and never a traceback.

The commands run in-process through Typer's runner (the same code as the console script, without paying the
interpreter start-up per case); a few run as real processes with a timeout, to show nothing hangs. Every case runs
on files the corpus makes (a small npz stands in for CIFAR where a case needs some data set to reach its check), so
none needs the data folder; cases whose premise is the machine (no GPU) say so and are skipped where it fails.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.models import build_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.toml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    np.savez(d / "ok.npz", images=rng.integers(0, 256, size=(120, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(120) % 10)
    (d / "corrupt.npz").write_bytes(b"this is not a zip archive")
    np.savez(d / "floats.npz", images=np.zeros((10, 32, 32), dtype=np.float32), labels=np.zeros(10, dtype=np.int64))
    np.savez(d / "no_images.npz", pictures=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    np.savez(d / "label_count.npz", images=np.zeros((10, 32, 32, 3), dtype=np.uint8), labels=np.zeros(7))
    (d / "empty").mkdir()
    (d / "unreadable" / "cats").mkdir(parents=True)
    (d / "unreadable" / "cats" / "a.png").write_bytes(b"\x89PNG garbage, not an image")
    (d / "corrupt.pt").write_bytes(bytes(range(256)))  # neither a zip archive nor a pickle
    torch.save({"weights": argparse.Namespace(x=1)}, d / "objects.pt")
    torch.save(build_model("convnet", 10, width=8).state_dict(), d / "convnet.pt")
    torch.save(build_model("lenet_zhu", 100).state_dict(), d / "lenet_100_classes.pt")
    torch.save([1, 2, 3], d / "list.pt")
    (d / "truncated.pt").write_bytes((d / "convnet.pt").read_bytes()[:300])
    (d / "broken.toml").write_text("[federation\nrounds = 3\n")
    (d / "unknown_section.toml").write_text("[federaton]\nrounds = 3\n")
    (d / "cuda_experiment.toml").write_text('name = "x"\ndataset = "cifar10"\nindices = "0-1"\n'
                                            '[victims.v]\nmodel = "lenet_zhu"\n[[cases]]\nname = "c"\nvictim = "v"\n'
                                            'attack = { name = "dlg", iterations = 2 }\n')
    sweep = f'base = "{QUICKSTART}"\nname = "s"\noutput_dir = "{d}/sweeps"\n[set]\n"data.dataset" = "{d}/ok.npz"\n'
    (d / "broken.toml").write_text('name = "x"\n[data\ndataset = 1\n')
    axis = '[[axes]]\nkey = "client.batch_size"\nvalues = [1, 2]\n'
    (d / "sweep_two_forms.toml").write_text(sweep + '[[axes]]\nkey = "seed"\nvalues = [1]\nname = "x"\n'
                                            'points = [{label = "a", set = {seed = 2}}]\n')
    (d / "sweep_bad_point.toml").write_text(sweep + axis + '[[axes]]\nname = "defense"\npoints = [{label = "none", '
                                            'set = {defenses = []}}, {label = "k", set = {defenses = '
                                            '[{name = "topk", fraction = 5}]}}]\n')
    (d / "sweep_twice.toml").write_text(sweep + axis + '[[axes]]\nname = "b"\npoints = [{label = "a", '
                                        'set = {"client.batch_size" = 3}}]\n')
    (d / "sweep_no_base.toml").write_text(sweep.replace(QUICKSTART, "/nonexistent/base.toml") + axis)
    (d / "sweep_unknown.toml").write_text(sweep + axis + "paralel = 2\n")
    (d / "sweep_ok.toml").write_text(sweep + axis)
    (d / "sweep_bad_key.toml").write_text(sweep + '[[axes]]\nkey = "federation.roundz"\nvalues = [1]\n')
    (d / "sweep_no_data.toml").write_text(sweep + '[[axes]]\nkey = "data.dataset"\n'
                                          f'values = ["{d}/ok.npz", "/nonexistent/data.npz"]\n')
    return d


def run_set(*assignments):
    return ["run", QUICKSTART, *[a for s in assignments for a in ("--set", s)]]


ATTACK = ["attack", "--indices", "0-0", "--iterations", "2"]

CASES = [
    # fedsim run: config keys
    ("unknown key", run_set("bogus=1"), "bogus: unknown key"),
    ("negative rounds", run_set("federation.rounds=-1"), "federation.rounds"),
    ("string lr", run_set('client.lr="fast"'), "client.lr"),
    ("unknown attack key", run_set("attacks.0.iterationz=5"), "attacks.0.iterationz: unknown key"),
    ("unknown attack", run_set('attacks.0.name="nope"'), "nope"),
    ("unknown defense", run_set('defenses=[{name="nope"}]'), "nope"),
    ("defense parameter", run_set('defenses=[{name="topk", fraction=2}]'), "defenses.0.fraction"),
    ("client_dp without noise", run_set('defenses=[{name="client_dp", clip=1.0}]'), "noise_multiplier or epsilon"),
    ("client_dp on BatchNorm", run_set('model.name="convnet"', 'defenses=[{name="client_dp", clip=1.0, '
                                       'noise_multiplier=1.0}]'), "defenses.0: client_dp on a victim with BatchNorm"),
    ("dp delta", run_set("privacy.delta=2"), "privacy.delta"),
    ("bn stats under secure aggregation", run_set('defenses=[{name="share_bn_stats"}]',
                                                  "threat.secure_aggregation=true"), "share_bn_stats with threat.secure_aggregation"),
    ("fedbn without batchnorm", run_set('defenses=[{name="fedbn"}]'), "fedbn on a victim without BatchNorm"),
    ("dp_sgd on batchnorm", run_set('model.name="convnet"', 'defenses=[{name="dp_sgd", clip=1.0, noise_multiplier=1.0}]'),
     "dp_sgd: Opacus cannot compute per-sample gradients"),
    ("client sampling", run_set('federation.sampling="random"'), "federation.sampling"),
    ("unknown model", run_set('model.name="resnet1000"'), "resnet1000"),
    ("threat labels", run_set('threat.labels="maybe"'), "threat.labels"),
    ("client mode", run_set('client.mode="fedprox"'), "client.mode"),
    ("partition", run_set('data.partition="zipf"'), "data.partition"),
    ("clients per round", run_set("federation.clients_per_round=20"), "clients_per_round"),
    ("attacked per round", run_set("attack.clients_per_round=9"), "attack.clients_per_round"),
    ("bn shared without defense", run_set("threat.bn_stats_shared=true"), "share_bn_stats"),
    ("samples exceed partition", run_set('client.mode="fedavg"', "client.num_samples=100000"), "client.num_samples"),
    ("executor", run_set('attack.executor="threads"'), "attack.executor"),
    # combinations that cannot be attacked as configured, refused before any round runs
    ("known labels under secure aggregation", run_set('threat.labels="known"', "threat.secure_aggregation=true"),
     "secure_aggregation"),
    ("shuffled order replayed", run_set('client.mode="fedavg"', "client.num_samples=2", "client.shuffle=true"),
     "client.shuffle"),
    ("analytic on a conv victim", run_set('attacks=[{name="analytic"}]'), "attacks.0: analytic recovery needs"),
    ("shared BN without the defense", run_set('attacks=[{name="gradinversion", bn_source="shared"}]'),
     "bn_source=shared"),
    ("override syntax", ["run", QUICKSTART, "--set", "federation.rounds"], "expected key=value"),
    # devices and resources
    ("device tpu", run_set('device="tpu"'), "tpu"),
    ("device cuda", run_set('device="cuda"'), "device='cuda'"),
    ("device cuda index", run_set('device="cuda:3"'), "cuda:3"),
    ("client gpus", run_set("ray.client_gpus=1"), "ray.client_gpus"),
    ("attacker gpus", run_set("attack.gpus_per_worker=1"), "attack.gpus_per_worker"),
    ("client cpus", run_set("ray.client_cpus=64"), "ray.client_cpus"),
    ("attacker resource", run_set("attack.resources={attacker_node=1}"), "attack.resources.attacker_node"),
    # checkpoints
    ("missing checkpoint", run_set('model.checkpoint="/nonexistent/model.pt"'), "/nonexistent/model.pt"),
    ("corrupt checkpoint", lambda f: run_set(f'model.checkpoint="{f}/corrupt.pt"'), "corrupt.pt"),
    ("pickled objects", lambda f: run_set(f'model.checkpoint="{f}/objects.pt"'), "weights_only"),
    ("other architecture", lambda f: run_set(f'model.checkpoint="{f}/convnet.pt"'), "does not fit model 'lenet_zhu'"),
    ("other class count", lambda f: run_set(f'model.checkpoint="{f}/lenet_100_classes.pt"'), "shape"),
    ("not a state dict", lambda f: run_set(f'model.checkpoint="{f}/list.pt"'), "not a state dict"),
    ("truncated checkpoint", lambda f: run_set(f'model.checkpoint="{f}/truncated.pt"'), "truncated.pt"),
    ("missing prior", run_set('attacks=[{name="gi_w", prior="/nonexistent/prior.pt"}]'), "/nonexistent/prior.pt"),
    # data files
    ("missing data file", run_set('data.dataset="/nonexistent/cifar.npz"'), "/nonexistent/cifar.npz"),
    ("corrupt npz", lambda f: run_set(f'data.dataset="{f}/corrupt.npz"'), "corrupt.npz"),
    ("float images", lambda f: run_set(f'data.dataset="{f}/floats.npz"'), "uint8"),
    ("npz without images", lambda f: run_set(f'data.dataset="{f}/no_images.npz"'), "'images'"),
    ("label count", lambda f: run_set(f'data.dataset="{f}/label_count.npz"'), "labels"),
    ("empty folder", lambda f: run_set(f'data.dataset="{f}/empty"'), "holds no images"),
    ("unreadable image", lambda f: run_set(f'data.dataset="{f}/unreadable"'), "a.png"),
    # config files
    ("missing config", ["run", "/nonexistent/config.toml"], "/nonexistent/config.toml"),
    ("broken toml", lambda f: ["run", f"{f}/broken.toml"], "broken.toml"),
    ("unknown section", lambda f: ["run", f"{f}/unknown_section.toml"], "federaton: unknown key"),
    # keys as the user typed them (never a class name), a near miss suggested; paths the user names must exist
    ("misspelt config key", run_set("federation.roudns=3"), "federation.roudns: unknown key (did you mean 'rounds'?)"),
    ("misspelt defense key", run_set('defenses=[{name="topk", fractoin=0.1}]'),
     "defenses.0.fractoin: unknown key (did you mean 'fraction'?)"),
    ("misspelt attack key", run_set("attacks.0.restrats=2"), "attacks.0.restrats: unknown key (did you mean 'restarts'?)"),
    ("data.path missing", run_set('data.dataset="cifar10"', 'data.path="/nonexistent/cifar"'),
     "data.path=/nonexistent/cifar: no such file or folder"),
    ("data.path without cifar", lambda f: run_set('data.dataset="cifar10"', f'data.path="{f}/empty"'),
     "no cifar-10-batches-py/ or cifar10_train*.npz there"),
    ("data.test_path missing", run_set('data.test_path="/nonexistent/test.npz"'),
     "data.test_path=/nonexistent/test.npz: no such file or folder"),
    ("resume and overwrite", ["run", QUICKSTART, "--resume", "--overwrite"], "exclude each other"),
    ("resume without a run", ["run", QUICKSTART, "--resume"], "no run to continue"),
    ("attack misspelt defense key", [*ATTACK, "--defense", "topk:fractoin=0.1"],
     "defense 'topk': fractoin: unknown key (did you mean 'fraction'?)"),
    ("attack misspelt parameter", [*ATTACK, "--param", "iteratoins=3"],
     "attack 'inverting_gradients': iteratoins: unknown key (did you mean 'iterations'?)"),
    ("attack data path", [*ATTACK, "--dataset", "imagefolder", "--data-path", "/nonexistent/faces"],
     "--data-path=/nonexistent/faces: no such file or folder"),
    # fedsim attack flags
    ("attack name", [*ATTACK, "--attack", "nope"], "nope"),
    ("attack model", [*ATTACK, "--model", "nope"], "nope"),
    ("attack indices", [*ATTACK[:1], "--indices", "a-b"], "a-b"),
    ("attack indices range", [*ATTACK[:1], "--indices", "99999"], "--indices"),
    ("attack indices repeated", [*ATTACK[:1], "--indices", "0-3,2"], "[2] given more than once"),
    ("attack labels", [*ATTACK, "--labels", "maybe"], "--labels"),
    ("attack label method", [*ATTACK, "--label-method", "nope"], "nope"),
    ("attack device", [*ATTACK, "--device", "tpu"], "--device"),
    ("attack cuda", [*ATTACK, "--device", "cuda"], "--device='cuda'"),
    ("attack corrupt victim", lambda f: [*ATTACK, "--trained", f"{f}/corrupt.pt"], "--trained"),
    ("attack mismatched victim", lambda f: [*ATTACK, "--trained", f"{f}/convnet.pt"], "--trained"),
    ("attack defense", [*ATTACK, "--defense", "nope"], "nope"),
    ("attack mode", [*ATTACK, "--mode", "fedprox"], "fedprox"),
    ("attack parameter", [*ATTACK, "--param", "restarts=-3"], "restarts"),
    ("attack prior", [*ATTACK, "--attack", "gi_w", "--prior", "/nonexistent/prior.pt"], "/nonexistent/prior.pt"),
    ("attack data", lambda f: [*ATTACK, "--dataset", f"{f}/corrupt.npz"], "corrupt.npz"),
    ("attack analytic on conv", ["attack", "--indices", "0-0", "--attack", "analytic"], "analytic recovery needs"),
    ("attack shared BN", [*ATTACK, "--attack", "gradinversion", "--param", 'bn_source="shared"'], "bn_source=shared"),
    # fedsim experiment and train-victim
    ("experiment missing", ["experiment", "/nonexistent/table.toml"], "/nonexistent/table.toml"),
    ("experiment device", lambda f: ["experiment", f"{f}/cuda_experiment.toml", "--device", "cuda"], "--device"),
    ("experiment override", lambda f: ["experiment", f"{f}/cuda_experiment.toml", "--set", "bogus=1"], "bogus"),
    # fedsim sweep: the sweep file and every point's config, before any point runs
    ("sweep missing", ["sweep", "/nonexistent/sweep.toml"], "/nonexistent/sweep.toml"),
    ("sweep not toml", lambda f: ["sweep", f"{f}/broken.toml"], "broken.toml: not valid TOML"),
    ("experiment not toml", lambda f: ["experiment", f"{f}/broken.toml"], "broken.toml: not valid TOML"),
    ("sweep axis forms", lambda f: ["sweep", f"{f}/sweep_two_forms.toml"], "either key and values"),
    ("sweep bad point", lambda f: ["sweep", f"{f}/sweep_bad_point.toml"], "point 1 (client.batch_size=1, defense=k)"),
    ("sweep key set twice", lambda f: ["sweep", f"{f}/sweep_twice.toml"], "'client.batch_size' is set by two axes"),
    ("sweep base", lambda f: ["sweep", f"{f}/sweep_no_base.toml"], "/nonexistent/base.toml"),
    ("sweep unknown key", lambda f: ["sweep", f"{f}/sweep_unknown.toml"], "paralel: unknown key"),
    ("sweep config key", lambda f: ["sweep", f"{f}/sweep_bad_key.toml"], "federation.roundz: unknown key"),
    ("sweep point data", lambda f: ["sweep", f"{f}/sweep_no_data.toml"], "/nonexistent/data.npz"),
    ("sweep override", lambda f: ["sweep", f"{f}/sweep_bad_key.toml", "--set", "bogus=1"], "bogus: unknown key"),
    ("sweep parallel on a cluster", lambda f: ["sweep", f"{f}/sweep_ok.toml", "--ray-address", "auto",
                                               "--parallel", "2"], "drop --parallel"),
    # fedsim report
    ("report missing", ["report", "/nonexistent/run"], "not a directory: /nonexistent/run"),
    ("report empty", lambda f: ["report", f"{f}/empty"], "holds no run"),
    ("train-victim model", ["train-victim", "--model", "nope", "--output", "/tmp/x.pt"], "nope"),
    ("train-victim data", lambda f: ["train-victim", "--dataset", f"{f}/empty", "--output", "/tmp/x.pt"],
     "holds no images"),
]


def no_gpu() -> bool:
    return not torch.cuda.is_available()


# What a case assumes of the machine, and why it is skipped where that does not hold.
NO_GPU = (no_gpu, "the case checks that a GPU request is refused on a machine without one")
PREMISES = {
    "device cuda": NO_GPU, "client gpus": NO_GPU, "attacker gpus": NO_GPU, "attack cuda": NO_GPU,
    "experiment device": NO_GPU,
    "device cuda index": (lambda: torch.cuda.device_count() <= 3, "the case needs fewer than 4 GPUs (cuda:3 absent)"),
}


def with_data(argv: list[str], files: Path, out: Path) -> list[str]:
    """The case's command on the corpus's own small data set (unless the case names its data) and output folder."""
    if argv[0] == "run":
        extra = [f'output_dir="{out}"'] + ([] if any("data.dataset" in a for a in argv)
                                           else [f'data.dataset="{files}/ok.npz"', "data.test_samples=20"])
        return [*argv, *[a for e in extra for a in ("--set", e)]]
    if argv[0] in ("attack", "train-victim") and "--dataset" not in argv:
        argv = [*argv, "--dataset", f"{files}/ok.npz"]
    if argv[0] == "attack":
        argv = [*argv, "--output", str(out)]
    return argv


@pytest.fixture
def ray_never_starts(monkeypatch):
    """Fails the test the moment anything calls ray.init (a bad input must stop before any work starts)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called for a bad input")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, args, expected, files, monkeypatch, tmp_path, ray_never_starts):
    holds, why = PREMISES.get(name, (lambda: True, ""))
    if not holds():
        pytest.skip(f"premise does not hold here: {why}")
    monkeypatch.chdir(ROOT)
    argv = with_data(args(files) if callable(args) else args, files, tmp_path / "out")
    result = CliRunner().invoke(app, argv)
    stderr = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {stderr}{result.exception!r}"
    assert "Traceback" not in stderr + result.stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], stderr
    assert not (tmp_path / "out" / "leakage.parquet").exists()  # no work was done


@pytest.mark.skipif(not no_gpu(), reason=f"premise does not hold here: {NO_GPU[1]}")
def test_a_gpu_request_without_a_gpu_exits_at_once_as_a_process(files, tmp_path):
    """The case that used to hang until killed (unschedulable attacker actors)."""
    argv = with_data(run_set('device="cuda"'), files, tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "fedsim.cli", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_directory_another_process_writes_is_one_line(files, tmp_path, monkeypatch):
    """Two runs must never write one directory (a sweep's cut-off point and its continuation, say)."""
    import os

    from fedsim.results import RunLock

    monkeypatch.chdir(ROOT)
    script = (f"import time; from fedsim.results import RunLock; held = RunLock({str(tmp_path / 'busy')!r}); "
              "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(app, ["run", QUICKSTART, "--set", f'output_dir="{tmp_path}"', "--set",
                                          'name="busy"', "--set", f'data.dataset="{files}/ok.npz"', "--quiet"])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert f"in use by another fedsim process (pid {holder.pid})" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path / "busy").release()  # the kernel dropped the dead holder's lock
    assert os.path.isfile(tmp_path / "busy" / ".lock")
