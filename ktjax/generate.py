"""Generation from the command line: a run directory or a Hugging Face model, a prompt or a chat.

    python -m ktjax.generate --run runs/sft_lora/<stamp> --prompt "Question: What is 12 + 30?"
    python -m ktjax.generate --model /models/Qwen3-30B-A3B --chat
    python -m ktjax.generate --model /models/Qwen3-30B-A3B --adapter runs/sft_lora/<stamp>/peft_adapter --chat
    python -m ktjax.generate --run DIR --prompt A --prompt B --temperature 0.8 --top-p 0.95 --seed 1

The decoding itself is ktjax.decoding (re-exported here: ``from ktjax.generate import generate``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable

import numpy as np

from ktjax.decoding import Generator, Sampling, generate, prompt_ids, sample
from ktjax.experiment import load_run
from ktjax.models import from_hf
from ktjax.models.peft_adapter import read_peft, read_peft_config
from ktjax.params import is_lora, merge_model, split_model
from ktjax.tokenizer import load_tokenizer

__all__ = ["Generator", "Sampling", "generate", "prompt_ids", "sample", "main"]


def _stream(tokenizer, eos: int | None) -> Callable[[int, np.ndarray], None]:
    """An on_token callback for one row: prints the text as it grows (a token may end mid-character)."""
    ids: list[int] = []
    shown = [""]

    def on_token(step: int, tokens: np.ndarray) -> None:
        if int(tokens[0]) != eos:
            ids.append(int(tokens[0]))
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            print(text[len(shown[0]) :], end="", flush=True)
            shown[0] = text

    return on_token


def _load(args: argparse.Namespace):
    """(model, tokenizer, what) from --run or --model."""
    if args.run:
        cfg, model, task, step = load_run(args.run)
        tokenizer = getattr(task, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                f"{args.run} trained on the sort task (digit tokens, no text): nothing to prompt"
            )
        if args.adapter is not None:
            raise ValueError("--adapter goes with --model: a run directory's model has its own adapters")
        return model, tokenizer, f"{cfg.name} run {args.run}, step {step}"
    if args.adapter is None:
        model = from_hf(args.model, dtype=args.dtype)
    else:
        rank, alpha, targets = read_peft_config(args.adapter)
        model = from_hf(args.model, dtype=args.dtype, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
        defn, params = split_model(model)
        params.update(read_peft(args.adapter, model.config, {n: v for n, v in params.items() if is_lora(n)}))
        model = merge_model(defn, params)
    has_tokenizer = (pathlib.Path(args.model) / "tokenizer.json").is_file()
    if not has_tokenizer:
        print(f"{args.model} has no tokenizer.json: using the byte tokenizer", file=sys.stderr)
    what = str(args.model) + (f" + adapter {args.adapter}" if args.adapter else "")
    return model, load_tokenizer(args.model if has_tokenizer else "bytes"), what


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktjax.generate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=pathlib.Path, help="a run directory: its config and newest checkpoint")
    source.add_argument("--model", type=pathlib.Path, help="a Hugging Face model directory")
    parser.add_argument("--adapter", type=pathlib.Path, help="with --model: a PEFT LoRA adapter directory")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="with --model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat it for a batch")
    parser.add_argument("--chat", action="store_true", help="a conversation, rendered by the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 (default): every token")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.prompt) == args.chat:
        parser.error("give --prompt TEXT (one or more) or --chat")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        model, tokenizer, what = _load(args)
        print(f"model: {what}", file=sys.stderr)
        gen = Generator(model)
        options = dict(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_id, sampling=sampling)
        if args.chat:
            _chat(gen, tokenizer, options)
        elif len(args.prompt) == 1:
            print(args.prompt[0], end="", flush=True)
            gen(
                [prompt_ids(tokenizer, args.prompt[0])],
                on_token=_stream(tokenizer, tokenizer.eos_id),
                **options,
            )
            print()
        else:
            for text, new in zip(
                args.prompt, gen([prompt_ids(tokenizer, p) for p in args.prompt], **options)
            ):
                print(f"{text}{tokenizer.decode([t for t in new if t != tokenizer.eos_id])}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _chat(gen: Generator, tokenizer, options: dict) -> None:
    """Reads user turns from stdin until an empty line or end of input; prints each reply as it comes."""
    messages: list[dict] = []
    while True:
        try:
            text = input("you> ")
        except EOFError:
            return
        if not text.strip():
            return
        messages.append({"role": "user", "content": text})
        ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
        print("model> ", end="", flush=True)
        new = gen([ids], on_token=_stream(tokenizer, tokenizer.eos_id), **options)[0]
        print()
        messages.append(
            {"role": "assistant", "content": tokenizer.decode([t for t in new if t != tokenizer.eos_id])}
        )


if __name__ == "__main__":
    sys.exit(main())
