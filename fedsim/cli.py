"""The ``fedsim`` command: run a federation, attack one update, train a victim.

Bad input (config keys, values, missing data) ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure how much private data leaks from federated learning.")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


THREADS_HELP = ("torch threads for this command (default: the CPUs this process may use that are not already busy, "
                "by the 1-minute load average, at least 1 and at most 4; torch's own default of one thread per core "
                "ran an attack 3.6-30x slower than one thread on a loaded machine).")


def default_threads() -> int:
    """The usable CPUs not already busy (1-minute load average), at least 1, at most 4: all of an idle machine,
    fewer on a busy one, where torch's one thread per core oversubscribes."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, min(4, usable - busy))


def use_threads(threads: int | None) -> int:
    """Set torch's thread count for a command: ``threads``, else :func:`default_threads`. Returns it."""
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def fail(message: str, code: int = 2) -> None:
    """One line on stderr; exit 2 for bad input, 1 for a run that failed."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _user_errors():
    from pydantic import ValidationError

    from .config import ConfigError
    from .data import DataError

    return (ConfigError, DataError, ValidationError, ValueError, FileNotFoundError)


def _one_line(err: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):  # the key in the user's words, not the model's class name
        from .registry import validation_problems

        key, problem = validation_problems(err)[0]
        return f"{key}: {problem}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _registered(registry: str) -> list[str]:
    """Names in one of fedsim's registries (for help texts; plugins' entry points are listed, not imported)."""
    from importlib import import_module

    module = "fedsim.models" if registry == "MODELS" else "fedsim.contract"
    found = getattr(import_module(module), registry)
    return found.names() if hasattr(found, "names") else sorted(found)


LEAKAGE_COLUMNS = {"round": "round", "client_id": "client", "attack": "attack", "batch_size": "batch",
                   "psnr_mean": "PSNR", "psnr_best": "PSNR best", "ssim_mean": "SSIM", "lpips_mean": "LPIPS",
                   "label_accuracy": "label acc", "attack_seconds": "seconds", "status": "status"}


def reported_columns(frame) -> list[str]:
    """Columns the attacks added to the rows (Reconstruction.columns, e.g. a learnt prior's round), in order;
    each label method's accuracy (label_acc_*) stays in the parquet, out of the console table."""
    from .contract import LeakageRecord

    fixed = set(LeakageRecord.__dataclass_fields__)
    return [c for c in frame.columns if c not in fixed and not c.startswith("label_acc_") and frame[c].notna().any()]


def leakage_table(frame, title: str) -> Table:
    table = Table(title=title)
    names = {k: v for k, v in LEAKAGE_COLUMNS.items() if k != "status"}
    names.update({c: c.replace("_", " ") for c in reported_columns(frame)})
    names["status"] = "status"
    cols = list(names)
    for col in cols:
        table.add_column(names[col], justify="left" if col in ("attack", "status") else "right")
    for _, row in frame.sort_values(["round", "client_id", "attack"]).iterrows():
        cells = []
        for col in cols:
            v = row.get(col, "")
            cells.append(str(int(v)) if isinstance(v, float) and v.is_integer() and col not in LEAKAGE_COLUMNS
                         else f"{v:.2f}" if isinstance(v, float) else str(v))
        table.add_row(*cells)
    return table


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run config TOML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set federation.rounds=5 (repeatable)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join an existing Ray cluster."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the same directory from its last finished round and attack its backlog."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in the directory (without "
                                   "it, a directory that holds a run is refused)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Run a federated simulation with an honest-but-curious server and report leakage per round and client."""
    from .config import load_config
    from .results import check_open, open_mode

    try:
        mode = open_mode(resume, overwrite)
        cfg = load_config(config, set_)
        check_open(cfg.run_dir, mode)  # before any data is read: a typo must not cost the earlier run
        if ray_address:
            cfg.ray.address = ray_address
        from .federation import prepare

        prepare(cfg)  # resolve data and partitions now: bad input fails before Ray starts
    except _user_errors() as err:
        fail(_one_line(err))
    from .driver import run_federation
    from .serverapp import RunInterrupted

    from strategies.reproducible import ClientFailure

    from .config import ConfigError
    from .results import DirectoryInUse, RunDirectoryError

    try:
        store = run_federation(cfg, ray_address=ray_address, mode=mode, show_progress=not quiet)
    except (ConfigError, DirectoryInUse, RunDirectoryError) as err:  # before Ray starts: a resume that does not fit, a busy directory
        fail(_one_line(err))
    except ClientFailure as err:  # federation.on_client_error = "stop"; the rows written so far stay
        fail(f"{err}; finished rounds are in {cfg.run_dir} (resume with --resume)", code=1)
    except RunInterrupted as err:
        interrupted(f"{err}; continue it with: fedsim run {config} {resume_args(set_)}--resume")
    rounds = store.rounds.frame()
    if len(rounds):
        console.print(rounds[["round", "test_accuracy", "test_loss", "model_checksum"]].to_string(index=False))
    leak = store.leakage.frame()
    if len(leak):
        console.print(leakage_table(leak, f"leakage: {cfg.name}"))
        summary = leak[leak.status == "ok"].groupby(["round", "attack"])[["psnr_mean", "ssim_mean", "label_accuracy"]].mean()
        console.print(summary.to_string())
    console.print(f"results in {store.root}")


def interrupted(message: str) -> None:
    """Ctrl-C: one line, exit 130 at once. Flower's ServerApp thread may still wait on replies that will never
    come (Ray is down), and it is not a daemon thread: a normal exit would wait for it."""
    err_console.print(f"[bold yellow]stopped:[/] {message}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def resume_args(overrides: list[str]) -> str:
    import shlex

    return "".join(f"--set {shlex.quote(o)} " for o in overrides)


def _parse_defense(text: str) -> dict:
    from .config import parse_value

    name, _, params = text.partition(":")
    spec: dict = {"name": name.strip()}
    for item in filter(None, (p.strip() for p in params.split(","))):
        if "=" not in item:
            raise ValueError(f"--defense {text!r}: expected NAME:key=value,...")
        k, v = item.split("=", 1)
        spec[k.strip()] = parse_value(v.strip())
    return spec


@app.command()
def attack(
    model: str = typer.Option("lenet_zhu", "--model", help="Victim architecture."),
    dataset: str = typer.Option("cifar10", "--dataset", help="cifar10, cifar100, or a path (.npz or image folder)."),
    split: str = typer.Option("test", "--split", help="Split of a named data set."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="ffhq: folder of <ffhq id>.json labels "
                                               "(--dataset ffhq --data-path FOLDER)."),
    data_path: Optional[Path] = typer.Option(None, "--data-path", help="Image folder of --dataset ffhq/imagefolder."),
    attribute: str = typer.Option("gender", "--attribute", help="ffhq: the face attribute used as the label."),
    image_size: int = typer.Option(64, "--image-size", help="Resize for image folders and ffhq."),
    indices: str = typer.Option("0-9", "--indices", help="Images to attack, e.g. 0-9 or 1,4,7."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per client update (consecutive)."),
    attack_name: str = typer.Option("inverting_gradients", "--attack", help="Attack name: "
                                    f"{', '.join(_registered('ATTACKS'))} (or one an installed plugin registers)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="Optimisation steps of the attack "
                                             "(default: the attack's own)."),
    tv: Optional[float] = typer.Option(None, "--tv", min=0.0, help="Total-variation weight."),
    restarts: Optional[int] = typer.Option(None, "--restarts", min=1, help="Independent starts per update; the "
                                           "one whose simulated update fits best is kept (default: the attack's)."),
    attack_lr: Optional[float] = typer.Option(None, "--attack-lr", help="Attack optimiser step size."),
    param: list[str] = typer.Option([], "--param", help="Other attack parameter key=value (repeatable)."),
    trained: Optional[Path] = typer.Option(None, "--trained", help="Victim checkpoint (from train-victim)."),
    prior: Optional[Path] = typer.Option(None, "--prior", help="Generator checkpoint for generative attacks "
                                         "(from `fedsim prior train`)."),
    width: int = typer.Option(64, "--width", help="convnet/resnet18 width."),
    activation: str = typer.Option("default", "--activation", help="default, or sigmoid (the victim's ReLUs "
                                   "become Sigmoids, as CI-Net's notebooks)."),
    defense: list[str] = typer.Option([], "--defense", help="NAME:k=v,... applied by the client (repeatable)."),
    mode: str = typer.Option("fedsgd", "--mode", help="fedsgd or fedavg."),
    lr: float = typer.Option(0.1, "--lr", help="Client learning rate."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="FedAvg local epochs."),
    local_batch_size: Optional[int] = typer.Option(None, "--local-batch-size", help="FedAvg mini-batch size."),
    shuffle: bool = typer.Option(False, "--shuffle", help="FedAvg: the client reshuffles its images every epoch "
                                 "(an order the attacker does not know)."),
    labels: str = typer.Option("recovered", "--labels", help="known (the client shares its labels) or recovered "
                               "(from the update)."),
    label_method: str = typer.Option("auto", "--label-method", help="How labels are recovered: "
                                     f"{', '.join(_registered('LABEL_METHODS'))}."),
    public_data: Optional[str] = typer.Option(None, "--public-data", help="The attacker's own images (cifar10:test "
                                              "or a path; not the attacked set) for a self-tuning attack "
                                              "(--param 'tune={trials=8}')."),
    seed: int = typer.Option(0, "--seed", help="Run seed: the victim's initialisation, the client's draws and, on its "
                             "own branch, the attacker's."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    output: Path = typer.Option(Path("runs/attack"), "--output", help="Directory for leakage.parquet and grids."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results already in --output (without it, "
                                   "a directory that holds results is refused)."),
) -> None:
    """Attack single client updates without a federation (the fast path for research and paper checks)."""
    from .config import ClientConfig, build_threat, parse_value
    from .contract import LABEL_METHODS, build_attack
    from .data import load_dataset
    from .single import SingleUpdateJob, parse_indices, run_single

    try:
        from .checks import check_device
        from .results import check_open

        check_open(output, "overwrite" if overwrite else "new",
                   hint="use --overwrite to replace it, or another --output")
        check_device(device, "--device")
        if mode not in ("fedsgd", "fedavg"):
            raise ValueError(f"--mode must be fedsgd or fedavg, not {mode!r}")
        if labels not in ("known", "recovered"):
            raise ValueError(f"--labels must be known or recovered, not {labels!r}")
        from .registry import lookup

        lookup(LABEL_METHODS, label_method, "label method (--label-method)")
        use_threads(threads)
        spec: dict = {"name": attack_name}
        for key, value in (("iterations", iterations), ("tv", tv), ("restarts", restarts), ("lr", attack_lr),
                           ("prior", str(prior) if prior else None)):
            if value is not None:
                spec[key] = value
        for item in param:
            k, _, v = item.partition("=")
            spec[k.strip()] = parse_value(v.strip())
        attack_obj = build_attack(spec)
        client = ClientConfig(mode=mode, lr=lr, epochs=epochs, batch_size=local_batch_size or batch_size,
                              num_samples=batch_size if mode == "fedavg" else None, shuffle=shuffle)
        from .defenses import build_defense

        defenses = [build_defense(_parse_defense(d)) for d in defense]
        from .data import is_same_data

        if public_data and is_same_data(public_data, dataset, split, data_path):
            raise ValueError(f"--public-data {public_data} is the attacked data set; the attacker's public data must "
                             "be another")
        threat = build_threat(defenses, labels=labels, label_method=label_method, public_data=public_data)
        data = load_dataset(dataset, split, path=data_path, annotations=annotations, attribute=attribute,
                            image_size=image_size, path_key="--data-path")
        job = SingleUpdateJob(data=data, model_name=model, indices=parse_indices(indices), batch_size=batch_size,
                              attack=attack_obj, train=client.train_config(), defenses=defenses, threat=threat,
                              width=width, checkpoint=str(trained) if trained else None, seed=seed, device=device,
                              activation=activation)
        rows = run_single(job, output, overwrite=overwrite)
    except _user_errors() as err:
        fail(_one_line(err))
    import pandas as pd

    frame = pd.DataFrame([r.to_row() for r in rows])
    console.print(leakage_table(frame, f"{attack_name} on {model} ({data.name} {indices}, batch {batch_size})"))
    ok = frame[frame.status == "ok"]
    if len(ok):
        console.print(f"PSNR {ok.psnr_mean.mean():.2f} +- {ok.psnr_mean.std(ddof=0):.2f} dB over {len(ok)} updates; "
                      f"SSIM {ok.ssim_mean.mean():.3f}; label accuracy {ok.label_accuracy.mean():.3f}; "
                      f"{ok.attack_seconds.mean():.1f} s per update")
    console.print(f"results in {output}")
    failed = frame[frame.status != "ok"]
    if len(failed):  # rows are kept (the failure is the result), but the command did not do what was asked
        fail(f"{len(failed)} of {len(frame)} updates failed: {failed.error.iloc[0]}", code=1)


@app.command()
def experiment(
    config: Path = typer.Argument(..., help="Experiment TOML (cases of a paper table)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set indices=0-19."),
    only: list[str] = typer.Option([], "--only", help="Run only cases whose name contains this (repeatable)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Reproduce a paper table: run its cases and write the markdown table next to the config."""
    from .experiment import run_experiment_file

    try:
        from .checks import check_device

        check_device(device, "--device")
        use_threads(threads)
        frame = run_experiment_file(config, set_, only, device=device, log=console.print)
    except _user_errors() as err:
        fail(_one_line(err))
    console.print(config.with_suffix(".md").read_text())
    console.print(f"{len(frame)} rows")


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="Sweep TOML: a base run config and the axes of its grid."),
    set_: list[str] = typer.Option([], "--set", help="Override a key in every point (repeatable)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="Points at once (default: the file's "
                                           "parallel; at most one per core)."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the sweep's earlier points and start over."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Run the points on an existing Ray "
                                              "cluster (one at a time: not with --parallel)."),
    status: bool = typer.Option(False, "--status", help="Only show each point's state (runs nothing)."),
) -> None:
    """Run one federation per grid point; rerunning continues a stopped sweep (finished points are kept)."""
    from .sweep import load_sweep, point_status, run_sweep

    try:
        grid = load_sweep(config, set_)
        if status:
            table = Table(title=f"sweep {grid.spec.name} in {grid.root}")
            for col in ("#", "point", "status", "attempts", "seconds", "error"):
                table.add_column(col, justify="right" if col in ("#", "attempts", "seconds") else "left")
            for point in grid.points:
                st = point_status(point)
                table.add_row(str(st["index"]), st["point"], st["status"], str(st["attempts"]),
                              "" if st["seconds"] is None else f"{st['seconds']:.0f}", st["error"])
            console.print(table)
            return
        from .federation import prepare
        from .sweep import point_config

        for point in grid.points:  # data, models, defenses and devices of every point, before any run starts
            try:
                prepare(point_config(grid, point))
            except _user_errors() as err:
                raise ValueError(f"point {point.index} ({point.label}): {_one_line(err)}") from None
        console.print(f"sweep {grid.spec.name}: {len(grid.points)} points over {', '.join(grid.columns)} "
                      f"in {grid.root}")
        counts = run_sweep(grid, parallel=parallel, fresh=fresh, ray_address=ray_address, log=console.print)
    except _user_errors() as err:
        fail(_one_line(err))
    except KeyboardInterrupt:
        fail(f"stopped; finished points are kept in {grid.root} (run the same command to continue)", 1)
    import pandas as pd

    summary = pd.read_parquet(grid.root / "summary.parquet")
    if len(summary):
        cols = [c for c in [*grid.columns, "attack", "images", "psnr_mean", "ssim_mean", "label_accuracy",
                            "utility", "epsilon"] if c in summary]
        console.print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    console.print(f"{counts['done']} of {len(grid.points)} points done; tables in {grid.root}")
    if counts["failed"]:
        fail(f"{counts['failed']} points failed (their run.log has the reason); rerun to retry them", 1)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="A run directory (runs/<name>) or a sweep directory."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file (default: DIRECTORY/report.html)."),
) -> None:
    """Write one self-contained HTML report (plots and images embedded) of a run or a sweep."""
    from .report import build_report

    try:
        path = build_report(directory, output)
    except _user_errors() as err:
        fail(_one_line(err))
    console.print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("train-victim")
def train_victim(
    model: str = typer.Option("lenet_zhu", "--model", help=f"Victim architecture: {', '.join(_registered('MODELS'))}."),
    dataset: str = typer.Option("cifar10", "--dataset", help="cifar10, cifar100, or a path (.npz or image folder); "
                                "its test split, where it has one, gives the test accuracy."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the training split."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Mini-batch size."),
    lr: float = typer.Option(0.01, "--lr", help="SGD learning rate (Nesterov momentum 0.9, weight decay 5e-4)."),
    width: int = typer.Option(64, "--width", help="convnet/resnet18 width."),
    seed: int = typer.Option(0, "--seed", help="Initialisation and data-order seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    output: Path = typer.Option(..., "--output", help="Where to save the state dict (.pt)."),
) -> None:
    """Train a victim centrally (SGD with momentum, flips and crops) and save it for --trained / model.checkpoint."""
    from .data import load_dataset
    from .victims import train_centrally

    try:
        use_threads(threads)
        train = load_dataset(dataset, "train")
        try:
            test = load_dataset(dataset, "test")
        except Exception:  # noqa: BLE001 - a source without a test split is fine
            test = None
        result = train_centrally(model, train, test, epochs=epochs, batch_size=batch_size, lr=lr, width=width,
                                 seed=seed, output=output, log=console.print)
    except _user_errors() as err:
        fail(_one_line(err))
    console.print(f"saved {output} (train accuracy {result['train_accuracy']:.3f}, "
                  f"test accuracy {result['test_accuracy']:.3f})")


def add_plugin_commands() -> None:
    """Command groups of plugins (entry-point group ``fedsim.commands``: name -> a typer app), e.g. the attacker's
    ``fedsim prior``."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="fedsim.commands"):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take the other commands down
            err_console.print(f"[yellow]warning:[/] plugin command {ep.name!r} ({ep.value}) failed to load: {err}")


def main() -> None:
    add_plugin_commands()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("fedsim", "attacker", "strategies"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
