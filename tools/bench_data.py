"""Times data preparation: chat rendering + tokenisation of synthetic conversations, serial, in parallel,
and again from the cache.

    python tools/bench_data.py --rows 20000 --num-proc 2 [--tokenizer PATH] [--template llama3]

Rows are ultrafeedback-shaped (whole conversations in chosen/rejected, implicit prompt), with prompts and
answers of a few dozen words. Prints rows/s for each pass as JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from maxdpo.config import DataConfig
from maxdpo.data.pipeline import prepare_pairs

WORDS = ("the model answers each question with care and cites the source when it can while keeping the "
         "reply short clear and correct for every reader who asks about science history or maths").split()


def synthetic_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = []
    for _ in range(count):
        question = text(rng.randint(20, 60))
        conversation = [{"role": "user", "content": question}]
        rows.append({"prompt": question,
                     "chosen": conversation + [{"role": "assistant", "content": text(rng.randint(30, 120))}],
                     "rejected": conversation + [{"role": "assistant", "content": text(rng.randint(30, 120))}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(Path(__file__).parents[1] / "tests" / "data" / "chat_tokenizer"))
    parser.add_argument("--template", default="llama3")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    results = {"rows": args.rows, "tokenizer": args.tokenizer, "template": args.template}
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "prefs.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows)))
        passes = [("serial", 1, False), (f"parallel_{args.num_proc}", args.num_proc, False),
                  ("cached", args.num_proc, True)]
        for name, processes, cached in passes:
            cfg = DataConfig(chat_template=args.template, max_length=512, max_prompt_length=256, num_proc=processes,
                             cache_dir=str(Path(tmp) / ("cache" if cached else f"cache_{name}")))
            if cached:  # fill the cache first, then time the read
                prepare_pairs(str(source), "train", cfg, tokenizer, show_progress=False)
            start = time.perf_counter()
            prepared = prepare_pairs(str(source), "train", cfg, tokenizer, show_progress=False)
            seconds = time.perf_counter() - start
            results[name] = {"seconds": round(seconds, 2), "rows_per_sec": round(args.rows / seconds),
                             "tokens": int(prepared.store.tokens.size)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
