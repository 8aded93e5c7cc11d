"""Real runs of `python -m experiments.run` killed with SIGKILL at random moments and resumed, and a run
whose disk fills up: the state, the metrics log and the exit status stay what a user can trust."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from test_experiments import ROOT

pytestmark = pytest.mark.slow

TINY_RUN = [
    "--set=train.steps=24",
    "--set=train.eval_every=8",
    "--set=train.checkpoint_every=4",
    "--set=train.batch_size=8",
    "--set=train.eval_batch_size=16",
    "--set=train.log_every=1",
    "--set=train.progress=false",
    "--set=model.num_hidden_layers=1",
    "--set=model.hidden_size=32",
    "--set=model.head_dim=8",
    "--set=model.num_experts=4",
    "--set=model.moe_intermediate_size=16",
    "--set=data.length=4",
    "--set=generate_eval=0",  # the before/after generation is test_experiments'; here it would only cost time
]
VOLATILE = ("tokens_per_s",)  # the only logged values that depend on timing


def launch(workdir: pathlib.Path, **kw) -> subprocess.Popen:
    """The tiny run in `workdir`: a fresh start, or --resume once its config.json exists."""
    resume = ["--resume"] if (workdir / "config.json").exists() else TINY_RUN
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", "sort_hybrid", "--workdir", str(workdir), *resume],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def records(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without timings; a torn last line (what a kill may leave) is left out."""
    lines = (
        (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
    )
    out = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            assert n == len(lines), f"line {n} of {len(lines)} is not JSON: {line!r}"
            continue
        out.append({k: v for k, v in record.items() if k not in VOLATILE})
    return out


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_result(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reference = launch(tmp_path / "reference")
    killed = tmp_path / "killed"
    deaths = []
    for _ in range(4):
        proc = launch(killed)
        delay = rng.uniform(2.0, 9.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            deaths.append(round(delay, 2))
        else:
            break  # finished before its kill
        logged = records(killed)
        steps = [r["step"] for r in logged if r["kind"] == "train"]
        assert steps == sorted(set(steps)), f"seed {seed}, kills at {deaths}: {steps}"
    out, _ = launch(killed).communicate(timeout=300)
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out
    assert "run directory" in out, f"seed {seed}, kills at {deaths}:\n{out}"
    got, want = records(killed), records(tmp_path / "reference")
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    assert got == want, f"seed {seed}, kills at {deaths}: the resumed run's metrics differ"
    assert (
        json.loads((killed / "summary.json").read_text())["after"]
        == json.loads((tmp_path / "reference" / "summary.json").read_text())["after"]
    )


# Runs experiments.run in a process whose files may grow to 4 KiB: writes past it fail with EFBIG, as
# they would on a full disk (SIGXFSZ, which would kill the process instead, is ignored).
SMALL_FILES_ONLY = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); sys.argv[0] = 'experiments.run'; "
    "runpy.run_module('experiments.run', run_name='__main__')"
)


def test_a_failed_save_stops_the_run_at_once_with_one_error(tmp_path):
    # Full mode has no frozen parameters, so the first file past the limit is the first checkpoint's.
    workdir = tmp_path / "run"
    # Not even XLA's compilation cache may write past the limit (conftest.py turns it on).
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SMALL_FILES_ONLY,
            "sort_hybrid",
            "--workdir",
            str(workdir),
            *TINY_RUN,
            "--set=mode=full",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.perf_counter()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: saving step 4 to" in lines[0] and "File too large" in lines[0], err
    train_steps = [r["step"] for r in records(workdir) if r["kind"] == "train"]
    # The save runs in the background: its failure is seen after a later step, at the latest when the
    # next save (step 8) is due and must not start (on a loaded 2-core machine the writer thread can
    # take that long to fail).
    assert max(train_steps) <= 8, train_steps
    assert time.perf_counter() - start < 120
