"""Run an experiment.

    python -m experiments.run                    # the default experiment (sort_hybrid)
    python -m experiments.run NAME               # experiments/NAME.py
    python -m experiments.run --list             # every experiment, one line each
    python -m experiments.run NAME --set train.steps=50 --set model.hidden_size=64
    python -m experiments.run NAME --resume      # continue the latest run of NAME
    python -m experiments.run NAME --workdir DIR # default: runs/NAME/<timestamp>
    python -m experiments.run NAME --processes 2 # expert parallelism over 2 processes of this host

An experiment module defines ``get_config() -> ExperimentConfig`` and may define
``run(cfg, workdir, resume)`` to drive the run itself (default: ktjax.experiment.run_experiment).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import pkgutil
import sys
import traceback

import experiments
from ktjax import distributed
from ktjax.checkpoint import CheckpointError
from ktjax.experiment import ExperimentConfig, run_experiment
from ktjax.files import write_atomically
from ktjax.overrides import apply_overrides, from_json, to_json
from ktjax.train import TrainingStopped

# What a run can fail with that is the input's or the machine's fault, not ktjax's: printed as one line.
RUN_ERRORS = (ValueError, FileNotFoundError, UnicodeError, TrainingStopped, CheckpointError)
EXPERT_AXIS = "expert"  # the mesh axis several processes split the experts over, unless the config names one

DEFAULT = "sort_hybrid"
RUNS = pathlib.Path("runs")


def available() -> dict[str, str]:
    """Experiment name -> first line of its docstring."""
    names = {}
    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name == "run" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"experiments.{info.name}")
        if hasattr(module, "get_config"):
            names[info.name] = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    return dict(sorted(names.items()))


def latest_run(name: str) -> pathlib.Path | None:
    runs = sorted(p for p in (RUNS / name).glob("*") if (p / "config.json").exists())
    return runs[-1] if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", default=DEFAULT, help=f"experiment module (default: {DEFAULT})")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    parser.add_argument("--resume", action="store_true", help="continue the latest run (or --workdir)")
    parser.add_argument("--workdir", type=pathlib.Path, help="run directory (default: runs/NAME/<timestamp>)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="P",
        help="start P processes on this host, the routed experts split over them (default 1)",
    )
    parser.add_argument(
        "--coordinator-port",
        type=int,
        metavar="PORT",
        help="with --processes: process 0's port (default: a free one)",
    )
    args = parser.parse_args(argv)
    if args.processes < 1:
        return fail(f"--processes must be at least 1, got {args.processes}")
    launching = args.processes > 1 and distributed.ENV_PROCESSES not in os.environ
    if not launching:
        try:
            distributed.initialize()
        except distributed.LaunchError as err:
            return fail(str(err))

    names = available()
    if args.list:
        for name, line in names.items():
            print(f"{name:<20} {line}{'  (default)' if name == DEFAULT else ''}")
        return 0
    if args.name not in names:
        parser.error(f"no experiment {args.name!r}; available: {', '.join(names)}")
    module = importlib.import_module(f"experiments.{args.name}")

    workdir = args.workdir
    if args.resume:
        workdir = workdir or latest_run(args.name)
        if workdir is None or not (workdir / "config.json").exists():
            parser.error(f"--resume: no earlier run of {args.name} to continue")
        try:
            cfg = from_json(ExperimentConfig, json.loads((workdir / "config.json").read_text()))
        except ValueError as err:
            parser.error(f"--resume: {workdir / 'config.json'} cannot be read ({err})")
    else:
        cfg = module.get_config()
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if workdir is None and distributed.ENV_PROCESSES in os.environ:
            return fail("processes started one by one (JAX_NUM_PROCESSES) need the same --workdir on each")
        workdir = workdir or RUNS / args.name / stamp
    try:
        cfg = apply_overrides(cfg, args.set)
    except ValueError as err:
        parser.error(str(err))
    if launching:
        return launch(args, pathlib.Path(workdir))
    processes = int(os.environ.get(distributed.ENV_PROCESSES, 1))
    if processes > 1 and not cfg.model.expert_axis:
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(expert_axis=EXPERT_AXIS))
    driver = getattr(module, "run", run_experiment)
    workdir = pathlib.Path(workdir)
    main = distributed.is_main() if processes > 1 else True
    # Every run directory holds the config it runs with, whichever driver runs it (so --resume finds
    # it); the default driver rewrites it with the fields it resolves (architecture from model.path).
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomically(workdir / "config.json", json.dumps(to_json(cfg), indent=2))
    # The run's output is process 0's; the others print only their errors.
    quiet = contextlib.nullcontext() if main else contextlib.redirect_stdout(open(os.devnull, "w"))
    who = f"process {os.environ.get(distributed.ENV_PROCESS_ID)}: " if processes > 1 else ""
    try:
        with quiet:
            driver(cfg, workdir, args.resume)
        distributed.sync("ktjax_run_end")  # no process waits long for the others when JAX shuts down
    except RUN_ERRORS as err:
        if args.traceback:
            raise
        print(f"{parser.prog}: {who}error: {err}", file=sys.stderr)
        return stop(1, processes)
    except BaseException:
        if processes == 1:
            raise
        traceback.print_exc()
        return stop(1, processes)
    return 0


def stop(status: int, processes: int) -> int:
    """The exit status of a failed run; with several processes, this process leaves at once: JAX's
    exit waits for the others at a shutdown barrier, which a failed run's peers never reach (the
    launcher, or JAX's heartbeat on other hosts, then stops them)."""
    if processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def fail(message: str) -> int:
    """Prints `message` as the run's one-line error; the exit status of a bad command line."""
    print(f"python -m experiments.run: error: {message}", file=sys.stderr)
    return 2


def launch(args: argparse.Namespace, workdir: pathlib.Path) -> int:
    """Starts args.processes processes of this command on this host (ktjax.distributed.launch), all on
    one run directory."""
    command = [sys.executable, "-m", "experiments.run", args.name, "--workdir", str(workdir)]
    command += [f"--set={item}" for item in args.set]
    command += ["--resume"] * args.resume + ["--traceback"] * args.traceback
    try:
        return distributed.launch(command, args.processes, port=args.coordinator_port)
    except distributed.LaunchError as err:
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
