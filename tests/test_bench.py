"""The benchmark script runs and reports every case (a smoke test: no timing is asserted)."""

from ktjax.bench import CASES, bench_shape, report


def test_bench_times_every_case_for_both_backends_and_reports_them():
    shape = dict(T=16, H=32, I=16, K=2, E=4, r=2)
    result = bench_shape("tiny", shape, ["cpu", "xla"], reps=2)
    assert set(result["times"]) == {f"{b}/{c}" for b in ("cpu", "xla") for c in CASES}
    assert all(len(v) == 2 and min(v) > 0 for v in result["times"].values())
    text = report("tiny", result, peak_gflops=100.0, bandwidth_gbs=10.0)
    for label in (
        "forward",
        "full fwd+bwd",
        "lora fwd+bwd",
        "frozen fwd+bwd",
        "frozen backward",
        "bytes model",
    ):
        assert label in text
