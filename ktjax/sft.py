"""Supervised fine-tuning data: jsonl records -> packed, loss-masked training rows.

Each line is one record, either a chat::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

(rendered with the tokenizer's chat template; the loss is on the assistant turns), or::

    {"prompt": "...", "completion": "..."}

(``<bos> prompt completion <eos>``; the loss is on the completion and <eos>). Records are packed into
rows of ``seq_len`` tokens; ``segment_ids`` keep attention inside each record and ``positions``
restart at 0 for each. Batches are a deterministic function of (seed, step), as resuming needs.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import numpy as np

from ktjax.data import Batch


def read_jsonl(path: str | pathlib.Path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; ValueError naming the file and line of the first
    line that is not UTF-8 or not a JSON object."""
    records = []
    for n, raw in enumerate(pathlib.Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: a record must be a JSON object, got {type(record).__name__}")
        records.append((n, record))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _chat_pieces(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the rendered chat; assistant turns are trained.
    Each assistant turn's text is what rendering it adds after the generation prompt."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: every message needs 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ValueError(f"{where}: a message's 'role' and 'content' must be strings, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: a chat needs at least one assistant message to train on")
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        full = tokenizer.render_chat(messages[: i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(f"{where}: the chat template does not render turns as prefixes of each other")
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = tokenizer.render_chat(messages)[len(done) :]
    return pieces + [(rest, False)]


def tokenize_record(tokenizer, record: dict, where: str = "record") -> tuple[np.ndarray, np.ndarray]:
    """tokens [L] int32 and trained [L] bool (token i is a target the loss trains on)."""
    if "messages" in record:
        pieces = _chat_pieces(tokenizer, record["messages"], where)
        ids, trained = [], []
        for text, is_trained in pieces:
            piece = tokenizer.encode(text)
            ids += piece
            trained += [is_trained] * len(piece)
    elif "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {record[key]!r}")
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        prompt = bos + tokenizer.encode(record["prompt"])
        completion = tokenizer.encode(record["completion"])
        completion += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        ids, trained = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    else:
        raise ValueError(f"{where}: needs 'messages', or 'prompt' and 'completion' (keys: {sorted(record)})")
    if len(ids) < 2 or not any(trained[1:]):
        raise ValueError(f"{where}: nothing to train on after tokenizing")
    return np.asarray(ids, np.int32), np.asarray(trained, bool)


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> tuple[Batch, int]:
    """Packs examples (next-fit, in order) into rows of seq_len inputs. An example of L tokens takes
    L - 1 positions (inputs tokens[:-1], targets tokens[1:]); longer ones are truncated. Returns the
    rows and the number of truncated examples."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used, truncated = 0, 0
    for tokens, trained in examples:
        if len(tokens) - 1 > seq_len:
            tokens, trained, truncated = tokens[: seq_len + 1], trained[: seq_len + 1], truncated + 1
        need = len(tokens) - 1
        if used + need > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((tokens, trained))
        used += need
    n = len(rows)
    batch = {
        "input_ids": np.zeros((n, seq_len), np.int32),
        "targets": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for segment, (tokens, trained) in enumerate(row, 1):
            span = slice(start, start + len(tokens) - 1)
            batch["input_ids"][r, span] = tokens[:-1]
            batch["targets"][r, span] = tokens[1:]
            batch["loss_mask"][r, span] = trained[1:]
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = np.arange(len(tokens) - 1)
            start = span.stop
    return batch, truncated


@dataclass
class SFTData:
    """A jsonl file as packed training rows and a held-out eval split (``eval_fraction`` of the
    records, at least one when there are two or more)."""

    path: str
    tokenizer: object
    seq_len: int = 256
    seed: int = 0
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        records = read_jsonl(self.path)
        examples = [tokenize_record(self.tokenizer, r, f"{self.path}:{n}") for n, r in records]
        order = np.random.default_rng([self.seed, 0]).permutation(len(examples))
        n_eval = min(len(examples) - 1, max(1, round(self.eval_fraction * len(examples))))
        n_eval = n_eval if len(examples) > 1 else 0
        self.rows, self.truncated = pack([examples[i] for i in order[n_eval:]], self.seq_len)
        self.eval_rows = pack([examples[i] for i in order[:n_eval]], self.seq_len)[0] if n_eval else self.rows
        self.n_records, self.n_eval = len(examples), n_eval
        self.eval_examples = [examples[i] for i in order[:n_eval]]
        for what, rows in (("training", self.rows), ("held-out", self.eval_rows)):
            if not rows["loss_mask"].any():
                raise ValueError(
                    f"{self.path}: the {what} rows have no trained targets left after truncating records "
                    f"to seq_len={self.seq_len} tokens; raise data.seq_len"
                )
        self._orders: dict[int, np.ndarray] = {}  # epoch -> row order (the current epoch's)
        self.vocab_size = int(max(ids.max() for ids, _ in examples)) + 1  # smallest vocabulary that fits

    @property
    def n_rows(self) -> int:
        return len(self.rows["input_ids"])

    def batch(self, step: int, batch_size: int) -> Batch:
        """Rows step*B .. step*B + B - 1 of an endless stream that visits every row once per epoch, in
        an order shuffled per epoch."""
        picks = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(k, self.n_rows)
            if epoch not in self._orders:
                self._orders = {epoch: np.random.default_rng([self.seed, 1, epoch]).permutation(self.n_rows)}
            picks.append(self._orders[epoch][pos])
        return {key: value[picks] for key, value in self.rows.items()}

    def eval_batch(self, batch_size: int) -> Batch:
        """The first batch_size held-out rows (fewer when the split is smaller)."""
        return {key: value[:batch_size] for key, value in self.eval_rows.items()}

    def eval_prompts(self, n: int) -> list[tuple[list[int], list[int]]]:
        """Up to n held-out records as (prompt, answer) token ids for generation: the prompt is every
        token before the first trained one, the answer the trained tokens from there to the end of that
        run of them (a completion and its <eos>; a chat's first assistant turn)."""
        out = []
        for ids, trained in self.eval_examples[:n]:
            first = int(np.argmax(trained))
            end = first + int(np.argmin(trained[first:])) if not trained[first:].all() else len(ids)
            out.append((ids[:first].tolist(), ids[first:end].tolist()))
        return out

    def describe(self) -> str:
        fill = float((self.rows["segment_ids"] > 0).mean())
        trained = int(self.rows["loss_mask"].sum())
        return (
            f"SFT {self.path}: {self.n_records} records ({self.n_eval} held out) -> {self.n_rows} rows of "
            f"{self.seq_len} tokens, {fill:.0%} filled, {trained} trained targets, {self.truncated} truncated"
        )
