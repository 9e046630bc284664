"""`python -m maxdpo.generate SOURCE (--prompt TEXT ... | --data FILE) [key=value ...]`: what a model says.

SOURCE is a run folder (its `hf/` export, rendered with the run's chat template and system prompt) or a
Hugging Face model folder. Prompts are encoded as training encodes them: plain text with the tokenizer's
own special tokens, or, for conversations (message lists in --data) and under a chat template other than
`auto`, rendered with the generation prompt. Weights load onto the training mesh with its shardings
(`key=value` overrides set mesh.* and model.dtype as for train); sampling is `maxdpo.sampling`. One JSON
line per prompt: {"prompt", "completion"}, to stdout or --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Union

import jax
import numpy as np

from maxdpo.checkpoint.hf import spec_from_pretrained
from maxdpo.config import Config, ConfigError
from maxdpo.configure import load_config
from maxdpo.data.run_data import load_tokenizer
from maxdpo.data.sources import DataError, load_rows
from maxdpo.data.templates import ChatRenderer, resolve_template
from maxdpo.program import TrainProgram, architecture_from_config, build_train_program
from maxdpo.sampling import SamplingSettings, completions, left_padded, make_sampler, stop_token_ids
from maxdpo.sharding import make_mesh, replicated
from maxdpo.weights import load_sharded

Prompt = Union[str, list]


def source_config(source: Path, overrides: list[str]) -> Config:
    """The config to sample under: a run folder's own (its `hf/` export as the model) or the defaults, with the
    model and tokenizer from the HF folder and the command line's overrides."""
    run_config = source / "config.yaml"
    folder = source / "hf" if run_config.is_file() else source
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{source} is neither a run folder with an hf/ export nor a Hugging Face model folder")
    family = spec_from_pretrained(str(folder))[0].name
    fixed = [f"model.path={folder}", f"tokenizer.path={folder}", f"model.family={family}", "model.overrides=null",
             "lora.rank=0", "lora.quantize=null", "reference.path=null", "reference.precompute=false",
             "reference.sync_steps=0", "stages=[]"]
    return load_config(str(run_config) if run_config.is_file() else None, fixed + overrides)


class PromptEncoder:
    """Prompt -> token ids, by the rules training tokenises prompts with (`maxdpo.data.pipeline`)."""

    def __init__(self, tokenizer, chat_template: str, system_prompt: Optional[str]):
        self.tokenizer = tokenizer
        template = resolve_template(chat_template, tokenizer)
        self.renderer = ChatRenderer(tokenizer, template, system_prompt) if template else None
        self.always_templated = chat_template != "auto"

    def __call__(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) or self.always_templated:
            if self.renderer is None:
                raise DataError("a conversation prompt needs a chat template; the tokenizer has none (set "
                                "data.chat_template)")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer(self.renderer.prompt_text(messages), add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]


class Generator:
    """A model on the mesh and its tokenizer, sampling batches of prompts."""

    def __init__(self, cfg: Config, program: Optional[TrainProgram] = None, params: Optional[dict] = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg)
        self.encode = PromptEncoder(self.tokenizer, cfg.data.chat_template, cfg.data.system_prompt)
        self.stops = stop_token_ids(self.tokenizer)
        if program is None:
            program = build_train_program(cfg, make_mesh(cfg.mesh), 1, architecture_from_config(cfg))
        self.program = program
        self.params = params if params is not None else load_sharded(program, cfg.model.path)
        self._samplers: dict = {}  # one jitted sampler per SamplingSettings

    def __call__(self, prompts: list[Prompt], settings: SamplingSettings, seed: int = 0,
                 batch_size: int = 8) -> list[str]:
        """Completions of `prompts`, in batches of `batch_size` (the last one filled with one-token prompts) padded
        to a power-of-two length, so a few shapes compile."""
        pad = self.tokenizer.pad_token_id
        if settings not in self._samplers:
            self._samplers[settings] = make_sampler(self.program.graphdef, settings, self.stops, pad,
                                                    replicated(self.program.mesh))
        sample = self._samplers[settings]
        encoded = [self.encode(p) for p in prompts]
        texts, key = [], jax.random.key(seed)
        with self.program.mesh_context():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                filler = [[pad]] * (batch_size - len(batch))
                longest = max(map(len, batch))
                ids, mask = left_padded(batch + filler, pad, max(16, 1 << (longest - 1).bit_length()))
                key, draw = jax.random.split(key)
                tokens = np.asarray(sample(self.params, ids, mask, draw))[:len(batch)]
                texts += [self.tokenizer.decode(row, skip_special_tokens=True) for row in completions(tokens,
                                                                                                       self.stops)]
        return texts


def prompts_from(args: argparse.Namespace, cfg: Config) -> list[Prompt]:
    if args.prompt:
        return list(args.prompt)
    rows = load_rows(args.data, args.split)
    column = cfg.data.columns.prompt
    if column not in rows.column_names:
        raise DataError(f"{args.data}: no '{column}' column (data.columns.prompt); found {rows.column_names}")
    return list(rows[column])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maxdpo.generate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run folder or a Hugging Face model folder")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. mesh.tensor=2")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    given.add_argument("--data", help="a file or dataset whose prompt column to complete")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", help="write JSON lines here instead of stdout")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p)
        cfg = source_config(Path(args.source), args.overrides)
        prompts = prompts_from(args, cfg)
        generator = Generator(cfg)
        texts = generator(prompts, settings, args.seed, args.batch_size)
    except (ConfigError, DataError, OSError, ValueError) as err:
        print(f"maxdpo: error: {err}", file=sys.stderr)
        return 2
    if jax.process_index() != 0:  # every process samples; the first one writes
        return 0
    lines = "".join(json.dumps({"prompt": p, "completion": t}) + "\n" for p, t in zip(prompts, texts))
    if args.out:
        Path(args.out).write_text(lines)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
