"""Builds the bundled tiny assets: a word-level tokenizer and a synthetic preference dataset.

Every pair has one right and one wrong answer that follow from the prompt (parity of a number, copying
a string, the next letter, single-digit sums), so a tiny model can learn the preference; the eval pairs
are held out (no eval pair occurs in the training set). Run: `python tools/make_tiny.py [OUT_DIR]` (default: maxdpo/assets/tiny).
"""
from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = ["parity", "of", "even", "odd", "copy", "next", "after", "add", "is", ":", "+", "=", "?", "answer"]
LETTERS = list(string.ascii_lowercase)
DIGITS = [str(d) for d in range(10)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS + LETTERS + DIGITS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(  # BOS first, as Llama tokenizers do
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def parity_pair(rng: random.Random) -> dict:
    digits = [rng.choice(DIGITS) for _ in range(rng.randint(1, 5))]
    right = "even" if int(digits[-1]) % 2 == 0 else "odd"
    wrong = "odd" if right == "even" else "even"
    return {"prompt": f"parity of {' '.join(digits)} ?", "chosen": f" {right}", "rejected": f" {wrong}"}


def copy_pair(rng: random.Random) -> dict:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 4))]
    corrupted = list(letters)
    position = rng.randrange(len(letters))
    corrupted[position] = rng.choice([c for c in LETTERS if c != letters[position]])
    return {"prompt": f"copy {' '.join(letters)} :", "chosen": " " + " ".join(letters),
            "rejected": " " + " ".join(corrupted)}


def next_letter_pair(rng: random.Random) -> dict:
    index = rng.randrange(len(LETTERS) - 1)
    wrong = rng.choice([c for i, c in enumerate(LETTERS) if i != index + 1])
    return {"prompt": f"next after {LETTERS[index]} ?", "chosen": f" {LETTERS[index + 1]}", "rejected": f" {wrong}"}


def addition_pair(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    right = str(a + b)
    wrong = str(rng.choice([n for n in range(19) if n != a + b]))
    return {"prompt": f"add {a} + {b} =", "chosen": " " + " ".join(right), "rejected": " " + " ".join(wrong)}


TASKS = (parity_pair, copy_pair, next_letter_pair, addition_pair)


def make_pairs(count: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    """`count` pairs, the tasks in turn, none of whose (prompt, chosen, rejected) is in `exclude`."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        pair = TASKS[len(pairs) % len(TASKS)](rng)
        if tuple(pair.values()) not in exclude:
            pairs.append(pair)
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(Path(__file__).parents[1] / "maxdpo/assets/tiny"))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(out / "tokenizer")
    train = make_pairs(args.train, seed=0)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", make_pairs(args.eval, seed=1, exclude=frozenset(tuple(r.values()) for r in train)))
    print(f"wrote tokenizer, {args.train} train and {args.eval} eval pairs to {out}")


if __name__ == "__main__":
    main()
