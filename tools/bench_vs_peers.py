"""maxdpo vs the JAX DPO trainers people reach for (Tunix, EasyDeL) on one CPU: same Hugging Face Llama, same
pre-tokenised batches, same loss and optimizer; prints tokens/s of each and maxdpo's ratio to each.

    python tools/bench_vs_peers.py [--steps 8] [--warmup 2] [--pairs 8] [--prompt-len 128] [--completion-len 128]
                                   [--venvs DIR] [--maxdpo KEY=VALUE ...] [--json F]

One random fp32 Llama (default: hidden 512, 8 layers of 8 heads x 64, MLP 1536, vocab 32000) is saved in HF
format; each framework loads it in its own process and venv (created under --venvs on first use with the
versions pinned below; pip needs the package index) and trains DPO (sigmoid, beta 0.1, AdamW 1e-3 constant,
no weight decay, no clipping, the initial policy as reference) on the batches of `tools/peers/synthetic.py`.
Each side times every step from its own loop (`tools/peers/<side>_dpo.py` says where); tokens/s is
pairs x 2 x sequence length over the median step after --warmup. The sides' losses must agree step by step
(within --loss-tolerance), so the numbers compare one computation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import torch
import transformers

PEERS_DIR = Path(__file__).parent / "peers"
PEER_PACKAGES = {  # pinned: what docs/benchmarks.md reports
    "tunix": ["google-tunix==0.1.7"],
    "easydel": ["easydel==0.3.0", "pillow", "torch==2.13.0"],
}


def make_model(folder: Path, args) -> None:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        head_dim=args.head_dim, max_position_embeddings=args.prompt_len + args.completion_len,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = Path(__file__).parents[1] / "maxdpo" / "assets" / "tiny" / "tokenizer"  # EasyDeL wants a pad id
    transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)


def peer_python(name: str, venvs: Path) -> str:
    """The interpreter of the peer's venv, created and installed on first use."""
    python = venvs / name / "bin" / "python"
    if not python.exists():
        print(f"creating {venvs / name} with {' '.join(PEER_PACKAGES[name])}", flush=True)
        venv.create(venvs / name, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[name]], check=True)
    return str(python)


def run_side(name: str, python: str, model: Path, out: Path, args, options: list[str]) -> dict:
    command = [python, str(PEERS_DIR / f"{name}_dpo.py"), "--model", str(model), "--out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--pairs", str(args.pairs),
               "--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len)]
    command += [f"--option={option}" for option in options]
    print(f"running {name} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--peers", nargs="*", default=list(PEER_PACKAGES), choices=list(PEER_PACKAGES),
                        help="the frameworks to compare with (none: maxdpo's side alone)")
    parser.add_argument("--venvs", default=str(Path.home() / ".cache" / "maxdpo" / "peers"),
                        help="folder of the peers' venvs (default ~/.cache/maxdpo/peers)")
    parser.add_argument("--maxdpo", nargs="*", default=[], metavar="KEY=VALUE", help="maxdpo config overrides")
    parser.add_argument("--loss-tolerance", type=float, default=1e-2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", args)
        sides = {"maxdpo": run_side("maxdpo", sys.executable, tmp / "model", tmp / "maxdpo.json", args, args.maxdpo)}
        for name in args.peers:
            sides[name] = run_side(name, peer_python(name, Path(args.venvs)), tmp / "model", tmp / f"{name}.json",
                                   args, [])
    ours = sides["maxdpo"]
    result = dict(sides=sides, pairs=args.pairs, sequence=args.prompt_len + args.completion_len,
                  steps=args.steps, warmup=args.warmup, maxdpo_overrides=args.maxdpo, agree=True)
    for name in args.peers:
        theirs = sides[name]
        gap = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
        result[f"ratio_vs_{name}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        result[f"loss_gap_vs_{name}"] = gap
        result["agree"] &= gap <= args.loss_tolerance
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    for name, side in sides.items():
        ratio = "" if name == "maxdpo" else (f"  maxdpo is {result[f'ratio_vs_{name}']:.2f}x; "
                                             f"losses differ by at most {result[f'loss_gap_vs_{name}']:.1e}")
        print(f"{name:8s} {side['tokens_per_s']:7.0f} tokens/s  ({side['step_s']:.2f} s/step; "
              f"{side['versions']}){ratio}")
    if not result["agree"]:
        print(f"the losses differ by more than {args.loss_tolerance}: the sides do not compute the same step")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
