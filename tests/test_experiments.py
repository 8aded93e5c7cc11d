"""The front door: `python -m experiments.run` end to end, overrides, listing, resume."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from ktjax.experiment import ExperimentConfig
from ktjax.overrides import apply_overrides, from_json, to_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--set",
    "train.steps=6",
    "--set",
    "train.eval_every=3",
    "--set",
    "train.checkpoint_every=3",
    "--set",
    "train.batch_size=8",
    "--set",
    "train.eval_batch_size=16",
    "--set",
    "train.log_every=2",
    "--set",
    "model.num_hidden_layers=1",
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.head_dim=8",
    "--set",
    "model.num_experts=4",
    "--set",
    "model.moe_intermediate_size=16",
    "--set",
    "data.length=4",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_default_experiment_runs_end_to_end_and_leaves_a_complete_run_directory(tmp_path, capsys):
    result = run_cli(*TINY, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "experiment sort_hybrid: hybrid mode" in out
    assert "before (step 0)" in out and "after (step 6)" in out and "token_accuracy" in out
    assert "lora (routed experts)" in out  # the trainable-parameter summary
    assert "generated_exact_match (32 greedy)" in out and "examples (generated, after training):" in out
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in (run / "checkpoints" / "steps").iterdir()) == ["3", "6"]
    assert (run / "checkpoints" / "frozen").is_dir()
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["model"]["hidden_size"] == 32
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 3 and kinds.count("eval") == 3
    # the end-of-run line names everything the run wrote
    listed = "checkpoints/, config.json, curves.png, metrics.jsonl, peft_adapter/, summary.json"
    assert f"run directory: {run} ({listed})" in out

    # --resume continues the same run directory from its latest checkpoint, here to a later step.
    resumed = run_cli("--resume", "--workdir", str(run), "--set", "train.steps=8", "--set", "generate_eval=0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stdout and "after (step 8)" in resumed.stdout
    # resuming a finished run says so, and how to train more
    code, again, err = run_in_process(capsys, "--resume", "--workdir", str(run))
    assert code in (0, None), err[-3000:]
    assert "already trained its 8 steps" in again and "--set train.steps=16" in again


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """main() of experiments.run in this process (fast: no interpreter start), as (code, out, err)."""
    from experiments.run import main

    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_run_with_its_own_driver_leaves_its_config_and_can_be_resumed(tmp_path, capsys, monkeypatch):
    import experiments.compare_modes as module

    calls = []
    monkeypatch.setattr(module, "run", lambda cfg, workdir, resume: calls.append((cfg.train.steps, resume)))
    workdir = str(tmp_path / "run")
    assert run_in_process(capsys, "compare_modes", "--workdir", workdir, "--set", "train.steps=7")[0] == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 7
    assert run_in_process(capsys, "compare_modes", "--resume", "--workdir", workdir)[0] == 0
    assert calls == [(7, False), (7, True)]


def test_list_names_every_experiment_with_a_description(capsys):
    code, out, _ = run_in_process(capsys, "--list")
    assert code == 0
    lines = out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"sort_hybrid", "compare_modes", "throughput", "long_context", "sft_lora"} <= set(names)
    assert all(len(line.split()) > 2 for line in lines)
    assert any("(default)" in line for line in lines)


def test_long_context_trains_on_records_of_its_sequence_length_and_reports_speed_and_memory(tmp_path, capsys):
    from experiments.long_context import long_records

    records = long_records(3, 700, seed=1)
    assert all(len(r["prompt"]) + len(r["completion"]) == 698 for r in records)  # + <bos>, <eos>: 700
    workdir = tmp_path / "run"
    args = ["long_context", "--workdir", str(workdir), "--set", "data.seq_len=512", "--set", "train.steps=2"]
    args += ["--set", "model.num_hidden_layers=1"]
    code, out, err = run_in_process(
        capsys, *args, "--set", "generate_eval=0", "--set", "train.progress=false"
    )
    assert code in (0, None), err[-3000:]
    assert "rows of 512 tokens, 100% filled" in out and "0 truncated" in out
    assert "long_context: 512-token records, remat full, attention cpu" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["seq_len"] == 512 and summary["tokens_per_s"] > 0 and summary["peak_rss_gb"] > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=5", "unknown config key 'train.stpes'; did you mean train.steps"),
        ("model.hiden_size=5", "did you mean model.hidden_size"),
        ("train.steps=many", "train.steps expects int, got 'many'"),
        ("train.progress=maybe", "train.progress expects bool"),
        ("model.style=gpt", "style must be one of"),
        ("mode=partial", "mode must be one of"),
        ("steps", "must look like key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message, capsys):
    code, _, err = run_in_process(capsys, "--set", override)
    assert code != 0
    assert message in err


def test_unknown_experiment_lists_the_available_ones(capsys):
    code, _, err = run_in_process(capsys, "no_such_experiment")
    assert code != 0 and "available: " in err and "sort_hybrid" in err


def test_overrides_are_typed_and_nested():
    from experiments.sort_hybrid import get_config

    cfg = apply_overrides(
        get_config(),
        [
            "train.steps=7",
            "train.groups.lora.lr_peak=0.5",
            "model.lora_targets=experts,q_proj",
            "train.rules=*.lora_*=lora,*=frozen",
            "train.progress=false",
            "model.rope_theta=1e6",
        ],
    )
    assert cfg.train.steps == 7 and cfg.train.groups["lora"].lr_peak == 0.5
    assert cfg.model.lora_targets == ("experts", "q_proj")
    assert cfg.train.rules == (("*.lora_*", "lora"), ("*", "frozen"))
    assert cfg.train.progress is False and cfg.model.rope_theta == 1e6


def test_config_round_trips_through_json():
    from experiments.sort_hybrid import get_config

    cfg = apply_overrides(get_config(), ["train.rules=*=full"])
    assert from_json(ExperimentConfig, json.loads(json.dumps(to_json(cfg)))) == cfg


def test_optional_fields_accept_none_and_values():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        clip: float | None = 1.0

    assert apply_overrides(Cfg(), ["clip=none"]).clip is None
    assert apply_overrides(Cfg(), ["clip=0.5"]).clip == 0.5


@pytest.mark.slow
def test_the_quantized_30b_showcase_runs_at_one_layer(tmp_path):
    """experiments/qlora_30b with 1 of its 48 layers: int4 routed experts at Qwen3-30B-A3B's widths,
    generated quantized, LoRA adapters trained on them (the full run is measured by hand: README). The
    vocabulary is cut to 1024 tokens: drawing the 151936-row embedding and head would double the time."""
    steps = ("--set", "train.steps=2", "--set", "model.num_hidden_layers=1", "--set", "model.vocab_size=1024")
    result = run_cli("qlora_30b", *steps, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frozen (int4)" in result.stdout and "peak RSS" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["layers"] == 1 and summary["expert_quant"] == "int4"
    assert len(summary["losses"]) == 2 and all(math.isfinite(x) for x in summary["losses"])
    assert summary["tokens_per_s"] > 0 and len(summary["eval_loss"]) == 2
    assert not (tmp_path / "run" / "checkpoints" / "frozen").exists()  # 19 GB of frozen weights unsaved
