"""A corpus of bad inputs across `fedsim run` keys, the other commands' flags, data files, checkpoints and devices:
each must exit 2 with one line naming the offending key or value, before any work starts, and never a traceback.

The commands run in-process through Typer's runner (the same code as the console script, without paying the
interpreter start-up per case); a few run as real processes with a timeout, to show nothing hangs.
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
    sweep = f'base = "{QUICKSTART}"\nname = "s"\noutput_dir = "{d}/sweeps"\n'
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
                                          'values = ["cifar10", "/nonexistent/data.npz"]\n')
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
    # fedsim attack flags
    ("attack name", [*ATTACK, "--attack", "nope"], "nope"),
    ("attack model", [*ATTACK, "--model", "nope"], "nope"),
    ("attack indices", [*ATTACK[:1], "--indices", "a-b"], "a-b"),
    ("attack indices range", [*ATTACK[:1], "--indices", "99999"], "--indices"),
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


def test_the_corpus_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, args, expected, files, data_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = args(files) if callable(args) else args
    if argv[0] == "attack":
        argv = [*argv, "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, argv)
    stderr = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {stderr}{result.exception!r}"
    assert "Traceback" not in stderr + result.stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], stderr
    assert not (tmp_path / "out" / "leakage.parquet").exists()  # no work was done


def test_a_gpu_request_without_a_gpu_exits_at_once_as_a_process(data_dir):
    """The case that used to hang until killed (unschedulable attacker actors)."""
    done = subprocess.run([sys.executable, "-m", "fedsim.cli", *run_set('device="cuda"')], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_directory_another_process_writes_is_one_line(data_dir, tmp_path, monkeypatch):
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
                                          'name="busy"', "--quiet"])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.stderr
        assert f"in use by another fedsim process (pid {holder.pid})" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path / "busy").release()  # the kernel dropped the dead holder's lock
    assert os.path.isfile(tmp_path / "busy" / ".lock")
