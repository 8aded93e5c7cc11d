"""Run an experiment.

    python -m experiments.run                    # the default experiment (sort_hybrid)
    python -m experiments.run NAME               # experiments/NAME.py
    python -m experiments.run --list             # every experiment, one line each
    python -m experiments.run NAME --set train.steps=50 --set model.hidden_size=64
    python -m experiments.run NAME --resume      # continue the latest run of NAME
    python -m experiments.run NAME --workdir DIR # default: runs/NAME/<timestamp>

An experiment module defines ``get_config() -> ExperimentConfig`` and may define
``run(cfg, workdir, resume)`` to drive the run itself (default: ktjax.experiment.run_experiment).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import pkgutil
import sys

import experiments
from ktjax.checkpoint import CheckpointError
from ktjax.experiment import ExperimentConfig, run_experiment
from ktjax.files import write_atomically
from ktjax.overrides import apply_overrides, from_json, to_json
from ktjax.train import TrainingStopped

# What a run can fail with that is the input's or the machine's fault, not ktjax's: printed as one line.
RUN_ERRORS = (ValueError, FileNotFoundError, UnicodeError, TrainingStopped, CheckpointError)

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
    args = parser.parse_args(argv)

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
        workdir = workdir or RUNS / args.name / stamp
    try:
        cfg = apply_overrides(cfg, args.set)
    except ValueError as err:
        parser.error(str(err))
    driver = getattr(module, "run", run_experiment)
    workdir = pathlib.Path(workdir)
    # Every run directory holds the config it runs with, whichever driver runs it (so --resume finds
    # it); the default driver rewrites it with the fields it resolves (architecture from model.path).
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomically(workdir / "config.json", json.dumps(to_json(cfg), indent=2))
    try:
        driver(cfg, workdir, args.resume)
    except RUN_ERRORS as err:
        if args.traceback:
            raise
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
