"""What every side of `tools/bench_vs_peers.py` shares (numpy only: it is imported in each framework's venv).

The batches are pre-tokenised so no tokenizer differs: per step, `pairs` prompts of `prompt_len` tokens and
their chosen and rejected completions of `completion_len` tokens, ids uniform in [3, vocab), no padding,
drawn in that order from one generator seeded 0, so every side trains on the same tokens in the same order.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Iterator

import numpy as np


def preference_batches(steps: int, pairs: int, prompt_len: int, completion_len: int, vocab: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(prompt [pairs, P], chosen [pairs, C], rejected [pairs, C]) int32 token ids, one per step."""
    rng = np.random.default_rng(0)
    for _ in range(steps):
        yield tuple(rng.integers(3, vocab, (pairs, length), dtype=np.int32)
                    for length in (prompt_len, completion_len, completion_len))


def arguments(description: str) -> argparse.Namespace:
    """The command line every side takes (the driver passes the same values to each)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="Hugging Face Llama folder (fp32 safetensors)")
    parser.add_argument("--steps", type=int, required=True, help="timed steps")
    parser.add_argument("--warmup", type=int, required=True, help="untimed steps first (compilation)")
    parser.add_argument("--pairs", type=int, required=True)
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--completion-len", type=int, required=True)
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a framework-specific setting (maxdpo: a config override)")
    return parser.parse_args()


def write_result(args: argparse.Namespace, step_times: list[float], losses: list[float], **extra) -> None:
    """tokens/s = pairs x 2 x (prompt + completion) tokens over the median step time after the warmup."""
    timed = step_times[args.warmup:]
    if len(timed) != args.steps:
        raise RuntimeError(f"timed {len(timed)} steps, expected {args.steps}")
    tokens = args.pairs * 2 * (args.prompt_len + args.completion_len)
    median = statistics.median(timed)
    result = dict(tokens_per_s=tokens / median, step_s=median, step_s_all=timed, losses=losses, **extra)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
