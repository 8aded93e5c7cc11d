"""Data for training: batches are dicts of numpy arrays, a deterministic function of (seed, step),
so a resumed run sees exactly the batches an uninterrupted one would.

Batch keys (all [B, S]): input_ids int32, targets int32, loss_mask f32 (1 = train on this target),
segment_ids int32 (0 = padding), positions int32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass
class SortTask:
    """Sort `length` digits from [0, num_values): ``<bos> d1..dn <sep> sorted(d1..dn)``.

    Loss is on the sorted half only. Learnable by a small transformer in a few hundred steps, and
    checkable: teacher-forced accuracy on the answer tokens goes from chance (1/num_values) towards 1.
    """

    length: int = 8
    num_values: int = 10
    seed: int = 0
    descending: bool = False  # sort the other way (a related task to fine-tune to)

    PAD, BOS, SEP = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return 3 + self.num_values

    @property
    def seq_len(self) -> int:
        return 2 * self.length + 1  # inputs: <bos> digits <sep> answer[:-1]

    def _make(self, rng: np.random.Generator, batch_size: int) -> Batch:
        digits = rng.integers(0, self.num_values, (batch_size, self.length))
        answer = np.sort(digits, axis=1)
        if self.descending:
            answer = answer[:, ::-1]
        seq = np.concatenate(
            [np.full((batch_size, 1), self.BOS), digits + 3, np.full((batch_size, 1), self.SEP), answer + 3],
            axis=1,
        ).astype(np.int32)
        loss_mask = np.zeros((batch_size, self.seq_len), np.float32)
        loss_mask[:, self.length + 1 :] = 1.0  # the targets after <sep>: the sorted digits
        return {
            "input_ids": seq[:, :-1],
            "targets": seq[:, 1:],
            "loss_mask": loss_mask,
            "segment_ids": np.ones((batch_size, self.seq_len), np.int32),
            "positions": np.broadcast_to(
                np.arange(self.seq_len, dtype=np.int32), (batch_size, self.seq_len)
            ).copy(),
        }

    def batch(self, step: int, batch_size: int) -> Batch:
        """Training batch number `step` (same step, same batch)."""
        return self._make(np.random.default_rng([self.seed, step]), batch_size)

    def eval_batch(self, batch_size: int) -> Batch:
        """A fixed held-out batch (drawn from a stream training never uses)."""
        return self._make(np.random.default_rng([self.seed, 2**31 - 1]), batch_size)

    def eval_prompts(self, n: int) -> list[tuple[list[int], list[int]]]:
        """The first n held-out sequences as (prompt: <bos> digits <sep>, answer: the sorted digits)."""
        seq = self.eval_batch(n)["input_ids"]
        answers = np.sort(seq[:, 1 : 1 + self.length], axis=1)
        answers = answers[:, ::-1] if self.descending else answers
        return [(row[: self.length + 2].tolist(), ans.tolist()) for row, ans in zip(seq, answers)]

    def describe(self) -> str:
        order = "descending" if self.descending else "ascending"
        return (
            f"sort {self.length} digits in [0, {self.num_values}) {order}; answer tokens trained and scored"
        )


def answer_accuracy(logits: np.ndarray, batch: Batch) -> dict[str, float]:
    """Teacher-forced accuracy on the trained targets: per token and per whole sequence."""
    pred = np.asarray(logits).argmax(-1)
    mask = batch["loss_mask"] > 0
    right = (pred == batch["targets"]) | ~mask
    return {
        "token_accuracy": float(((pred == batch["targets"]) & mask).sum() / mask.sum()),
        "sequence_accuracy": float(right.all(axis=1).mean()),
    }
