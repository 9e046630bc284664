"""maxdpo's train step on a Hugging Face Llama folder, timed per step like the other sides.

The run's own program (`build_train_program`) with the folder's weights, the initial policy as reference,
DPO sigmoid, beta 0.1, AdamW 1e-3 constant, weight decay 0, no clipping, the config's defaults otherwise
(`--option key=value` overrides, e.g. model.scan_layers=false). A step is timed from laying out its
batch on the host to reading its loss.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from maxdpo.configure import load_config
from maxdpo.data.batch import collate
from maxdpo.data.prefix_sharing import collate_shared
from maxdpo.data.tokenize import TokenizedPair
from maxdpo.program import build_train_program
from maxdpo.sharding import make_mesh
from maxdpo.weights import initial_params, reference_params

from synthetic import arguments, preference_batches, write_result


def main() -> None:
    args = arguments(__doc__)
    prompt_len, length = args.prompt_len, args.prompt_len + args.completion_len
    total = args.warmup + args.steps
    cfg = load_config(None, [f"model.path={args.model}", "model.overrides=null", "tokenizer.path=null",
                             f"trainer.batch_size={args.pairs}", f"data.max_length={length}",
                             f"data.max_prompt_length={prompt_len}",
                             "optimizer.learning_rate=1e-3", "optimizer.schedule=constant",
                             "optimizer.warmup_ratio=0", "optimizer.max_grad_norm=0", *args.option])
    program = build_train_program(cfg, make_mesh(cfg.mesh), total)
    times, losses = [], []
    with program.mesh_context():
        params = initial_params(program)
        reference = reference_params(program, params) if program.reference_model else None
        state = program.init_state(params)
        for prompt, chosen, rejected in preference_batches(total, args.pairs, prompt_len, args.completion_len,
                                                           program.spec.vocab_size):
            start = time.perf_counter()
            rows = [[TokenizedPair(np.concatenate([p, c]), np.concatenate([p, r]), prompt_len, prompt_len)]
                    for p, c, r in zip(prompt, chosen, rejected)]
            if cfg.data.prefix_sharing:
                batch = collate_shared(rows, 2 * length - prompt_len, 1, pad_id=0)
            else:
                batch = collate(rows, length, 1, pad_id=0)
            state, metrics = program.train_step(state, reference, program.global_batch(batch))
            losses.append(float(metrics["loss"]))
            times.append(time.perf_counter() - start)
    write_result(args, times, losses, versions={"maxdpo": "this checkout", "jax": jax.__version__},
                 settings=f"{cfg.model.dtype}, remat {cfg.model.remat}, scan_layers {cfg.model.scan_layers}, "
                          f"attention {cfg.model.attention}, options {args.option}")


if __name__ == "__main__":
    main()
