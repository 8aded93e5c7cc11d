"""The benchmark script runs and reports every case (a smoke test: no timing is asserted)."""

import pytest

from ktjax.bench import CASES, _timed, bench_shape, main, make_inputs, report
from ktjax.bench_quant import BASES, bench_quant_shape, report_quant


def test_the_default_backends_are_the_default_mode_the_f32_mode_and_xla(capsys):
    # The default mode for the benchmark's bf16 weights is bf16 intermediates; cpu_f32 asks for f32.
    from ktjax.bench import CPU_BACKENDS

    assert CPU_BACKENDS == {"cpu": "auto", "cpu_f32": "f32"}
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "cpu (default mode: bf16 intermediates for bf16 weights)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_bench_times_every_case_for_both_backends_and_reports_them(capsys):
    shape = dict(T=16, H=32, I=16, K=2, E=4, r=2)
    result = bench_shape("tiny", shape, ["cpu", "xla"], reps=2)
    progress = capsys.readouterr()
    assert "tiny: round 2 of 2" in progress.err and progress.out == ""  # progress on stderr only
    assert set(result["times"]) == {f"{b}/{c}" for b in ("cpu", "xla") for c in CASES}
    assert all(len(v) == 2 and min(v) > 0 for v in result["times"].values())
    text = report("tiny", result, peak_gflops=100.0, bandwidth_gbs=10.0)
    for label in (
        "forward",
        "full fwd+bwd",
        "lora fwd+bwd",
        "frozen fwd+bwd",
        "frozen backward",
        "backward rows: fwd+bwd minus forward",
        "bytes model",
    ):
        assert label in text


def test_bench_reports_the_f32_intermediates_mode_beside_the_default():
    shape = dict(T=16, H=32, I=16, K=2, E=4, r=2)
    result = bench_shape("tiny", shape, ["cpu", "cpu_f32", "xla"], reps=1)
    assert {k.split("/")[0] for k in result["times"]} == {"cpu", "cpu_f32", "xla"}
    text = report("tiny", result, peak_gflops=100.0, bandwidth_gbs=10.0)
    for label in ("% peak of cpu/cpu_f32", "xla/cpu ", "xla/cpu_f32", "cpu_f32 forward ="):
        assert label in text
    head, forward = text.splitlines()[2:4]
    assert len(head) == len(forward)  # the columns line up
    assert forward.count("/") == 3 + 3  # ms min/med of 3 backends; tokens/s, GFLOP/s, % peak of 2


def test_machine_probes_measure_positive_rates_and_reject_bad_input():
    from ktjax import ffi, machine

    assert machine.measure_peak_gflops(1, seconds=0.05) > 0
    bf16 = machine.measure_peak_gflops(1, seconds=0.05, bf16_pairs=True)
    assert bf16 > 0 if ffi.selected_isa() == "avx512_bf16" else bf16 == 0
    for threads in (1, 2):
        gbs = machine.measure_read_bandwidth_gbs(threads, n_bytes=32 << 20, passes=2)
        # finite, and not a pass timed as zero (no memory system reads 10 TB/s: HBM3e does ~8 per chip)
        assert 0 < gbs < 10_000, gbs
    for bad in (dict(threads=0), dict(n_bytes=0), dict(passes=0)):
        with pytest.raises(ValueError, match="must be positive"):
            machine.measure_read_bandwidth_gbs(**{"threads": 1, "n_bytes": 1 << 20, "passes": 1, **bad})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reps", "0"], "--reps must be at least 1"),
        (["--shapes", "S1,S9"], "unknown shape"),
        (["--backends", "cpu,gpu"], "unknown backend"),
        (["--json", "/nonexistent-dir/b.json"], "--json: no directory"),
        (["--png", "/nonexistent-dir/b.png"], "--png: no directory"),
    ],
)
def test_bench_refuses_bad_arguments_before_it_measures_anything(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "ktjax.bench:" not in captured.out  # no probe ran


def test_the_quant_bench_times_every_base_against_bf16_and_counts_their_bytes(capsys):
    shape = dict(T=16, H=256, I=128, K=2, E=4, r=2)
    result = bench_quant_shape("tiny", make_inputs(shape), reps=2, timed=_timed)
    assert set(result["times"]) == {f"{b}/{c}" for b in BASES for c in ("forward", "lora")}
    assert all(len(v) == 2 and min(v) > 0 for v in result["times"].values())
    per_expert = result["bytes_per_expert"]  # 3 projections of 256 x 128 weights
    assert per_expert["bf16"] == 3 * 256 * 128 * 2
    assert per_expert["int8"] == 3 * 256 * 128 + (2 * 128 + 256) * 4  # + a scale per row
    assert per_expert["int4"] == 3 * 256 * 64 + (2 * 128 * 2 + 256 * 1) * 2 * 2  # + bf16 (scale, min) pairs
    text = report_quant("tiny", shape, result, peak_gflops=100.0, bandwidth_gbs=10.0)
    assert all(f"\n{b} " in text for b in BASES) and "x bf16" in text


def test_decode_floor_counts_the_bytes_a_step_reads_and_decoding_is_timed():
    from ktjax.bench_decode import step_bytes, time_decode
    from ktjax.decoding import Generator
    from ktjax.models import build_model, qwen3_moe
    from ktjax.params import split_model

    cfg = qwen3_moe(vocab_size=50, hidden_size=32, head_dim=8, num_experts=8, num_experts_per_tok=2)
    model = build_model(cfg)
    _, params = split_model(model)
    nbytes = {n: v.size * v.dtype.itemsize for n, v in params.items()}
    experts = sum(b for n, b in nbytes.items() if ".experts." in n)
    embedding = nbytes["model.embed_tokens.weight"]
    rest = sum(nbytes.values()) - experts - embedding
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * 4 * cfg.num_hidden_layers  # per cached position
    # batch 1: top-2 of 8 experts, one embedding row, every other weight, the cache
    assert step_bytes(cfg, params, 1, 10) == pytest.approx(experts * 2 / 8 + embedding / 50 + rest + 10 * kv)
    # batch 4: the expected distinct experts under uniform routing, 8 (1 - (6/8)^4)
    distinct = 8 * (1 - 0.75**4)
    assert step_bytes(cfg, params, 4, 10) == pytest.approx(
        experts * distinct / 8 + 4 * embedding / 50 + rest + 40 * kv
    )
    assert time_decode(Generator(model), batch=2, prompt=5, new_tokens=3, vocab=50) > 0


def test_the_attention_bench_times_every_backend_beside_the_references(capsys):
    from ktjax import bench_attention

    bench_attention.main(["--seqs", "40", "--dtypes", "f32", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("40 ")]
    names = {" ".join(row.split()[2:-2]) for row in rows}
    assert {"ktjax cpu forward", "ktjax cpu fwd+bwd", "ktjax blockwise forward"} <= names
    assert {"jax.nn.dot_product_attention forward"} <= names
    assert all(float(row.split()[-2]) > 0 for row in rows)


def test_the_sequence_bench_times_a_training_step_and_reads_its_peak_memory():
    from ktjax.bench_sequence import one_step

    result = one_step(32, "cpu", "full", steps=1)
    assert result["step_s"] > 0 and result["first_s"] > 0 and result["peak_rss_gb"] > 0.2  # the weights
    chunked = one_step(32, "cpu", "off", steps=1, vocab=512, loss_chunk=8)  # the loss in 4 chunks
    assert chunked["step_s"] > 0


def test_the_sequence_bench_refuses_bad_arguments(capsys):
    from ktjax import bench_sequence

    with pytest.raises(SystemExit):
        bench_sequence.main(["--remat", "sometimes"])
    assert "--remat of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_sequence.main(["--loss-chunks", "-1"])
    assert "--loss-chunks >= 0" in capsys.readouterr().err
