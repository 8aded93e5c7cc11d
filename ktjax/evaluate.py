"""Loss and perplexity of a model on a jsonl file's trained tokens, from the command line.

    python -m ktjax.evaluate --run runs/sft_lora/<stamp> --data held_out.jsonl
    python -m ktjax.evaluate --model /models/Qwen3-30B-A3B --adapter DIR/peft_adapter --data chats.jsonl

The records are tokenized as training tokenizes them (ktjax.sft: chats' assistant turns, completions
and their <eos>) and packed into rows of --seq-len tokens; the loss is the mean of -log p over the
trained tokens, the perplexity its exponential.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ktjax.data import Batch
from ktjax.model_args import add_model_arguments, load_model
from ktjax.nn.decoder import MoeForCausalLM
from ktjax.params import merge_model, split_model
from ktjax.sft import pack, read_jsonl, tokenize_record
from ktjax.train import loss_sum


def evaluate_rows(model: MoeForCausalLM, rows: Batch, batch_size: int = 8, progress: bool = True) -> dict:
    """rows: packed rows (ktjax.sft.pack) -> {"loss": mean -log p over trained targets, "perplexity",
    "tokens": how many}. One compiled program serves every batch (the last one is padded)."""
    defn, params = split_model(model)

    @jax.jit
    def nll_sum(params, batch):
        return loss_sum(merge_model(defn, params), batch)[0], jnp.sum(batch["loss_mask"])

    n = len(rows["input_ids"])
    total, count = 0.0, 0.0
    for start in tqdm(range(0, n, batch_size), desc="evaluate", unit="batch", disable=not progress):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        pad = batch_size - len(batch["input_ids"])
        if pad:  # padding rows: segment 0, nothing trained
            batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        s, c = nll_sum(params, batch)
        total, count = total + float(s), count + float(c)
    if count == 0:
        raise ValueError("the data has no trained tokens to evaluate")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktjax.evaluate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--data", required=True, help="a jsonl file of SFT records (chats or prompt/completion)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=1024, help="tokens per packed row (longer records are cut)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows per evaluation step")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, what = load_model(args)
        print(f"model: {what}", file=sys.stderr)
        records = read_jsonl(args.data)
        examples = [tokenize_record(tokenizer, r, f"{args.data}:{n}") for n, r in records]
        rows, truncated = pack(examples, args.seq_len)
        result = evaluate_rows(model, rows, args.batch_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result.update(records=len(records), truncated=truncated)
    if args.json:
        print(json.dumps(result))
    else:
        loss, perplexity = result["loss"], result["perplexity"]
        print(
            f"{args.data}: {len(records)} records ({truncated} cut to --seq-len {args.seq_len}), "
            f"{result['tokens']} trained tokens: loss {loss:.4f}, perplexity {perplexity:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
