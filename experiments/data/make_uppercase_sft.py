"""Writes uppercase_sft.jsonl: 2000 records asking to uppercase a random 3-6 letter word, alternately as
a prompt/completion record and as a chat. Run from the repository root:

    python experiments/data/make_uppercase_sft.py
"""

import json
import pathlib
import random


def main() -> None:
    rng = random.Random(0)
    lines = []
    for i in range(2000):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        question, answer = f"Uppercase: {word}", word.upper()
        if i % 2:
            record = {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            }
        else:
            record = {"prompt": question + "\nAnswer: ", "completion": answer}
        lines.append(json.dumps(record))
    (pathlib.Path(__file__).parent / "uppercase_sft.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
