"""Checkpoints are verified before they are trusted, and training stops on garbage: corrupted or
incomplete checkpoints are skipped (the run resumes from the newest good one), frozen parameters are
checked, non-finite steps stop training or are skipped, non-finite state is never saved, and the
metrics log is cut back to the state it resumes from."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from test_training import TASK, OneBatch, config, tiny

from ktjax.checkpoint import CheckpointError, Checkpoints
from ktjax.models import build_model
from ktjax.optim import HYBRID_RULES
from ktjax.train import TrainingStopped, train

pytestmark = pytest.mark.slow

CFG = config(steps=8, checkpoint_every=4, keep_checkpoints=3, rules=HYBRID_RULES)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An 8-step run with checkpoints at steps 4 and 8, and its final parameters."""
    workdir = tmp_path_factory.mktemp("run")
    result = train(build_model(tiny()), TASK, CFG, workdir)
    return workdir, result.params


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(directory: pathlib.Path) -> None:
    """Inverts 64 bytes in the middle of the largest file under `directory` (same size: orbax reads
    the array silently changed)."""
    path = largest_file(directory)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def truncate(step_dir: pathlib.Path) -> None:
    path = largest_file(step_dir / "opt_state")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "flipped_bytes": lambda d: flip_bytes(d / "trainable"),
    "truncated_file": truncate,
    "no_array_metadata": lambda d: (d / "trainable" / "_METADATA").unlink(),
    "no_meta": lambda d: shutil.rmtree(d / "meta"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_resume_skips_a_bad_newest_checkpoint_and_keeps_it_aside(corrupt, finished_run, tmp_path, capsys):
    source, want = finished_run
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    corrupt(tmp_path / "checkpoints" / "steps" / "8")
    capsys.readouterr()
    resumed = train(build_model(tiny()), TASK, CFG, tmp_path, resume=True)
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint step 8 skipped: "), out
    assert "resumed from step 4" in out
    assert (tmp_path / "checkpoints" / "rejected" / "step_8" / "trainable").is_dir()  # left on disk
    for name in want:  # steps 5-8 retrained from step 4 give the same parameters
        np.testing.assert_array_equal(resumed.params[name], want[name], err_msg=name)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in logged if r["kind"] == "eval"] == [0, 8]


def test_frozen_parameters_are_checked_against_the_run(finished_run, tmp_path):
    source, want = finished_run
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    flip_bytes(tmp_path / "checkpoints" / "frozen")
    # The model as built holds the run's frozen parameters (their checksums match): the damaged copy
    # on disk is not needed.
    resumed = train(build_model(tiny()), TASK, CFG, tmp_path, resume=True)
    for name in want:
        np.testing.assert_array_equal(resumed.params[name], want[name], err_msg=name)
    # A model built differently needs the saved copy, which no longer verifies: a clear stop.
    with pytest.raises(CheckpointError, match=r"frozen.*does not match its checksum.*cannot resume"):
        train(build_model(tiny(), seed=99), TASK, CFG, tmp_path, resume=True)


class PoisonedAt(OneBatch):
    """OneBatch, except that the batch of step `bad` (1-based) has a NaN loss weight."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def batch(self, step, batch_size):
        batch = dict(self.fixed)
        if step + 1 == self.bad:
            batch["loss_mask"] = batch["loss_mask"].copy()
            batch["loss_mask"][0, -1] = np.nan
        return batch


def test_a_nonfinite_step_stops_training_naming_it(tmp_path):
    cfg = config(steps=6, checkpoint_every=2, rules=HYBRID_RULES)
    with pytest.raises(TrainingStopped, match=r"step 3: the loss is nan and the grad norm is nan.*step 2"):
        train(build_model(tiny()), PoisonedAt(3), cfg, tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3 and np.isnan(logged[-1]["loss"])
    assert Checkpoints(tmp_path / "checkpoints").steps() == [2]


def test_skipping_a_nonfinite_step_is_as_if_it_never_happened(tmp_path):
    # With the same batch every step and a constant learning rate, 5 steps of which one is skipped
    # must give exactly the parameters of 4 clean steps: no update, optimizer state untouched.
    skipped = train(build_model(tiny()), PoisonedAt(3), config(steps=5, on_nonfinite="skip"), tmp_path / "a")
    clean = train(build_model(tiny()), OneBatch(), config(steps=4), tmp_path / "b")
    assert [r["skipped_steps"] for r in skipped.history] == [0, 0, 1, 1, 1]
    for name in clean.params:
        np.testing.assert_array_equal(skipped.params[name], clean.params[name], err_msg=name)


def test_nonfinite_state_is_never_saved(tmp_path):
    ckpt = Checkpoints(tmp_path, async_save=False)
    ckpt.start_fresh({})
    good = {"w": jnp.ones((3, 4))}
    with pytest.raises(CheckpointError, match=r"refusing to save step 1: \['w'\] holds NaN"):
        ckpt.save(1, {"w": jnp.ones((3, 4)).at[1, 2].set(jnp.inf)}, {}, {})
    with pytest.raises(CheckpointError, match=r"refusing to save step 1: \['mu'\]"):
        ckpt.save(1, good, {"mu": jnp.full((2,), jnp.nan)}, {})
    assert ckpt.steps() == []
    ckpt.close()


def test_a_torn_last_log_line_is_dropped_and_other_bad_lines_are_named(finished_run, tmp_path):
    source, want = finished_run
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    log = tmp_path / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '{"kind": "train", "step": 9, "lo')  # a kill while writing a line
    resumed = train(build_model(tiny()), TASK, CFG, tmp_path, resume=True)
    assert log.read_text() == good
    assert [r["step"] for r in resumed.history] == list(range(1, 9))
    lines = good.splitlines()
    log.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics record"):
        train(build_model(tiny()), TASK, CFG, tmp_path, resume=True)


def test_a_fresh_run_refuses_a_directory_with_checkpoints(finished_run, tmp_path):
    source, _ = finished_run
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of steps \[4, 8\]"):
        train(build_model(tiny()), TASK, CFG, tmp_path)
