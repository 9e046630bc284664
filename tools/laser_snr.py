"""Ranks decoder layers (or weight matrices) by the signal-to-noise ratio of their singular values and writes
a `freeze.trainable` YAML that trains only the top fraction: the laserRMT analysis behind "laser-QLoRA".

    python tools/laser_snr.py MODEL_DIR --top-fraction 0.5 [--out freeze.yaml] [--families mlp,self_attn]
                              [--by layer|matrix|family] [--score laserrmt|mp]

Scanned: every HF Linear weight [n, m] of a decoder layer (attention and MLP projections, Mixtral's router
and per-expert w1/w2/w3), read one at a time from the safetensors (single file or sharded with an index)
of a model family maxdpo knows (so every pattern written names tensors the trainer has). Skipped: norms and
biases (vectors, no spectrum) and embeddings / lm_head (outside the decoder layers, which is all laserRMT
scans). SVDs run on the CPU in float64, one matrix at a time. `--families` keeps only
tensors whose name after the layer prefix contains one of the comma-separated substrings (laserRMT's
`layer_type in name`).

Formula (cognitivecomputations/laserRMT, `calculate_snr_for_layer` in laserQlora.ipynb / laser_scanner.py):
S = singular values of W in float64, beta = min(n, m) / max(n, m), noise threshold
lambda = scale * (1 + sqrt(beta)): the Marchenko-Pastur upper edge sigma * (sqrt(n) + sqrt(m)) of an
i.i.d. noise matrix with entry std sigma, written with scale = sigma * sqrt(max(n, m)).
signal = sum of the S_i > lambda, noise = sum of the S_i <= lambda, SNR = signal / noise (inf when noise is 0).
  --score laserrmt (default, the recipe): scale = IQR(S) / 1.349 (linear quantiles, the IQR of a unit
      normal, as laserRMT does) and the score is SNR / max(S), laser-QLoRA's "SNR ratio" (in units of 1 / the
      weights' scale, so compare it within one model). Faithful, but not an MP estimate:
      pure Gaussian noise scores well above 0 (tall matrices even inf), and the ratio falls as a planted
      signal grows, because max(S) grows with it.
  --score mp: scale = median(S) / mu(beta), mu the median singular value of the MP law at unit scale
      (Gavish & Donoho's noise estimate, robust to a low-rank signal), and the score is SNR itself: noise
      scores ~0 and a planted signal's singular values are exactly the ones above lambda.

Ranking: `--by layer` (default) ranks layers by the mean score of their matrices and trains whole layers
(`^model\\.layers\\.7\\.`; with `--families`, those layers' tensors whose names contain one of them);
`--by matrix` ranks all matrices together; `--by family` ranks within each module family (laser-QLoRA's top-n
per module type).
The top ceil(fraction * count) of each ranking train; the YAML's header lists the ranking, as does stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from maxdpo.checkpoint.hf import CheckpointReader, spec_from_pretrained
from maxdpo.checkpoint.safetensors_io import CheckpointError

IQR_PER_SIGMA = 1.349  # interquartile range of a unit normal
SCORES = ("laserrmt", "mp")


def mp_median(beta: float, points: int = 100_000) -> float:
    """Median singular value / sqrt(max(n, m)) of an n x m matrix of unit-variance noise (Marchenko-Pastur law,
    beta = min(n, m) / max(n, m)), by integrating the singular-value density on a midpoint grid."""
    lo, hi = 1 - math.sqrt(beta), 1 + math.sqrt(beta)
    edges = np.linspace(lo, hi, points + 1)
    s = (edges[1:] + edges[:-1]) / 2
    density = np.sqrt(np.clip((hi**2 - s**2) * (s**2 - lo**2), 0, None)) / (np.pi * beta * s)
    cdf = np.cumsum(density)
    return float(np.interp(cdf[-1] / 2, cdf, edges[1:]))


@dataclasses.dataclass(frozen=True)
class SNR:
    score: float  # what is ranked: SNR / max(S) for laserrmt, SNR for mp
    snr: float
    threshold: float  # lambda: singular values above it are signal
    num_signal: int


def spectrum_snr(s: np.ndarray, shape: tuple[int, int], score: str = "laserrmt") -> SNR:
    """SNR of the singular values `s` of a matrix of `shape` (formula in the module docstring)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    s = np.sort(np.asarray(s, np.float64))[::-1]
    if s[0] == 0:
        return SNR(0.0, 0.0, 0.0, 0)
    beta = min(shape) / max(shape)
    if score == "laserrmt":
        q75, q25 = np.quantile(s, [0.75, 0.25])
        scale = (q75 - q25) / IQR_PER_SIGMA
    else:
        scale = float(np.median(s)) / mp_median(beta)
    threshold = scale * (1 + math.sqrt(beta))
    signal, noise = s[s > threshold].sum(), s[s <= threshold].sum()
    snr = float(signal / noise) if noise else math.inf
    return SNR(snr / s[0] if score == "laserrmt" else snr, snr, float(threshold), int((s > threshold).sum()))


def matrix_snr(w: np.ndarray, score: str = "laserrmt") -> SNR:
    return spectrum_snr(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False), w.shape, score)


@dataclasses.dataclass(frozen=True)
class Matrix:
    name: str  # HF tensor name
    prefix: str  # its layer's HF prefix, e.g. 'model.layers.7.'
    family: str  # module family, e.g. 'self_attn.q_proj', 'block_sparse_moe.experts.w1'
    shape: tuple[int, int]  # HF [out, in]
    snr: SNR


def scan(path: str | Path, score: str = "laserrmt", families: tuple[str, ...] = ()) -> list[Matrix]:
    """SNR of every decoder-layer Linear weight of the HF folder `path` (whose names contain a `families` entry)."""
    family, spec = spec_from_pretrained(path)
    reader = CheckpointReader(path, spec, family, np.float32)  # checks every tensor's presence and shape up front
    matrices = []
    for entry in family.param_entries(spec):
        if "layer" not in entry.indexed_axes or entry.linear_in_ndim is None:
            continue  # embeddings, lm_head, final norm, per-layer norms
        head, tail = entry.hf_name.split("{layer}.")
        kind = tail.removesuffix(".weight").replace(".{expert}", "")
        for index, name in entry.tensors(spec):
            prefix = f"{head}{index[0]}."
            if families and not any(f in name[len(prefix):] for f in families):
                continue
            ours = reader.read(entry, name)  # [in..., out...]: the HF matrix transposed, in param_dtype
            w_t = ours.reshape(math.prod(ours.shape[:entry.linear_in_ndim]), -1)
            matrices.append(Matrix(name, prefix, kind, w_t.shape[::-1], matrix_snr(w_t, score)))
    if not matrices:
        raise CheckpointError(f"no decoder-layer weight matrix in {path} matches --families {','.join(families)}")
    return matrices


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one ranking entry trains: a layer or a single matrix."""
    label: str
    pattern: str
    score: float


def rank(matrices: list[Matrix], by: str, families: tuple[str, ...] = ()) -> dict[str, list[Unit]]:
    """Rankings, best first: one for `layer` and `matrix`, one per module family for `family`."""
    if by == "layer":
        layers: dict[str, list[float]] = {}
        for m in matrices:
            layers.setdefault(m.prefix, []).append(m.snr.score)
        only = "" if not families else ".*(?:" + "|".join(map(re.escape, families)) + ")"
        units = {"all": [Unit(p, f"^{re.escape(p)}{only}", float(np.mean(s))) for p, s in layers.items()]}
    else:
        units = {}
        for m in matrices:
            units.setdefault("all" if by == "matrix" else m.family, []).append(
                Unit(m.name, f"^{re.escape(m.name)}$", m.snr.score))
    return {key: sorted(group, key=lambda u: -u.score) for key, group in units.items()}


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"--top-fraction must be in (0, 1], got {fraction}")


def select(rankings: dict[str, list[Unit]], fraction: float) -> list[Unit]:
    """The top ceil(fraction * size) units of every ranking (0.07 of 100 is 7, though 0.07 * 100 > 7 in floats)."""
    check_fraction(fraction)
    return [u for group in rankings.values() for u in group[:math.ceil(round(fraction * len(group), 9))]]


def table(rankings: dict[str, list[Unit]], selected: list[Unit]) -> list[str]:
    chosen = {u.pattern for u in selected}
    lines = []
    for key, group in rankings.items():
        lines += ([] if key == "all" else [f"[{key}]"]) + ["rank  score         train  name"]
        lines += [f"{i:4d}  {u.score:<12.6g}  {'yes' if u.pattern in chosen else 'no':5s}  {u.label}"
                  for i, u in enumerate(group, 1)]
    return lines


def freeze_yaml(selected: list[Unit]) -> str:
    return yaml.safe_dump({"freeze": {"trainable": [u.pattern for u in selected]}}, sort_keys=False)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="Hugging Face folder: config.json + safetensors")
    parser.add_argument("--top-fraction", type=float, required=True, help="share to train, in (0, 1]")
    parser.add_argument("--out", help="YAML to write (default: print the freeze block)")
    parser.add_argument("--families", default="", help="comma-separated name substrings, e.g. mlp,self_attn")
    parser.add_argument("--by", choices=("layer", "matrix", "family"), default="layer")
    parser.add_argument("--score", choices=SCORES, default="laserrmt")
    args = parser.parse_args(argv)
    families = tuple(f for f in args.families.split(",") if f)
    try:
        check_fraction(args.top_fraction)
    except ValueError as err:
        parser.error(str(err))
    try:
        matrices = scan(args.model_dir, args.score, families)
    except CheckpointError as err:
        sys.exit(f"laser_snr: {err}")
    rankings = rank(matrices, args.by, families)
    selected = select(rankings, args.top_fraction)
    header = [f"laser SNR of {args.model_dir}: --score {args.score} --by {args.by} "
              f"--top-fraction {args.top_fraction}" + (f" --families {args.families}" if families else ""),
              *table(rankings, selected)]
    print("\n".join(header))
    if args.out:
        Path(args.out).write_text("".join(f"# {line}\n" for line in header) + freeze_yaml(selected))
        print(f"wrote {len(selected)} trainable patterns to {args.out}")
    else:
        print(freeze_yaml(selected), end="")


if __name__ == "__main__":
    main()
