"""A PNG of a run's curves: train/eval loss and tokens/s over steps, from its metrics.jsonl."""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(metrics_path: str | pathlib.Path, png_path: str | pathlib.Path, title: str = "") -> None:
    records = [
        json.loads(line) for line in pathlib.Path(metrics_path).read_text().splitlines() if line.strip()
    ]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats / target token)")
    ax_loss.set_yscale("log")
    ax_loss.grid(alpha=0.3)
    lines = ax_loss.get_lines()
    if any("token_accuracy" in r for r in evals):
        ax_acc = ax_loss.twinx()
        lines += ax_acc.plot(
            [r["step"] for r in evals],
            [r.get("token_accuracy", 0) for r in evals],
            "g--",
            label="eval token accuracy",
        )
        ax_acc.set_ylabel("eval token accuracy", color="g")
        ax_acc.set_ylim(0, 1)
    # one legend for both axes' lines, between the falling losses and the rising accuracy
    ax_loss.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax_speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:orange")
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("tokens / s")
    ax_speed.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_comparison(
    runs: dict[str, str | pathlib.Path], png_path: str | pathlib.Path, title: str = ""
) -> None:
    """Eval loss and eval token accuracy of several runs (label -> metrics.jsonl) on shared axes."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs.items():
        records = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
        evals = [r for r in records if r["kind"] == "eval"]
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["eval_loss"] for r in evals], "o-", label=label)
        ax_acc.plot(steps, [r.get("token_accuracy", 0) for r in evals], "o-", label=label)
    ax_loss.set(xlabel="step", ylabel="eval loss", yscale="log")
    ax_acc.set(xlabel="step", ylabel="eval token accuracy", ylim=(0, 1.05))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.legend(loc="lower right")  # accuracy curves rise towards 1.0, at the top
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
