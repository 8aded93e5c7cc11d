"""The command lines' model arguments (ktjax.generate, ktjax.evaluate): a run directory, or a Hugging
Face model directory with an optional PEFT adapter, and the tokenizer that goes with it."""

from __future__ import annotations

import argparse
import pathlib
import sys

from ktjax.experiment import load_run
from ktjax.models import from_hf
from ktjax.models.peft_adapter import read_peft, read_peft_config
from ktjax.nn.decoder import MoeForCausalLM
from ktjax.params import is_lora, merge_model, split_model
from ktjax.tokenizer import ByteTokenizer, model_tokenizer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=pathlib.Path, help="a run directory: its config and newest checkpoint")
    source.add_argument("--model", type=pathlib.Path, help="a Hugging Face model directory")
    parser.add_argument("--adapter", type=pathlib.Path, help="with --model: a PEFT LoRA adapter directory")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="with --model")


def load_model(args: argparse.Namespace) -> tuple[MoeForCausalLM, object, str]:
    """(model, tokenizer, what was loaded) from the arguments of ``add_model_arguments``. Raises
    ValueError or FileNotFoundError (one line for the user) when they do not name a usable model."""
    if args.run:
        if args.adapter is not None:
            raise ValueError("--adapter goes with --model: a run directory's model has its own adapters")
        cfg, model, task, step = load_run(args.run)
        tokenizer = getattr(task, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"{args.run} trained on the sort task (digit tokens, no text)")
        return model, tokenizer, f"{cfg.name} run {args.run}, step {step}"
    if args.adapter is None:
        model = from_hf(args.model, dtype=args.dtype)
    else:
        rank, alpha, targets = read_peft_config(args.adapter)
        model = from_hf(args.model, dtype=args.dtype, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
        defn, params = split_model(model)
        params.update(read_peft(args.adapter, model.config, {n: v for n, v in params.items() if is_lora(n)}))
        model = merge_model(defn, params)
    tokenizer = model_tokenizer(args.model)
    if isinstance(tokenizer, ByteTokenizer):
        print(f"{args.model} has no tokenizer.json: using the byte tokenizer", file=sys.stderr)
    what = str(args.model) + (f" + adapter {args.adapter}" if args.adapter else "")
    return model, tokenizer, what
