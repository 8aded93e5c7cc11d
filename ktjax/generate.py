"""Generation from the command line: a run directory or a Hugging Face model, a prompt or a chat.

    python -m ktjax.generate --run runs/sft_lora/<stamp> --prompt "Question: What is 12 + 30?"
    python -m ktjax.generate --model /models/Qwen3-30B-A3B --chat
    python -m ktjax.generate --model /models/Qwen3-30B-A3B --adapter runs/sft_lora/<stamp>/peft_adapter --chat
    python -m ktjax.generate --run DIR --prompt A --prompt B --temperature 0.8 --top-p 0.95 --seed 1

The decoding itself is ktjax.decoding (re-exported here: ``from ktjax.generate import generate``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np

from ktjax.decoding import Generator, Sampling, generate, prompt_ids, sample
from ktjax.model_args import add_model_arguments, load_model

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktjax.generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
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
        model, tokenizer, what = load_model(args)
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
