"""SLERP-merges two Hugging Face checkpoints of one architecture, tensor by tensor, as mergekit's `slerp` does.

    python tools/slerp_merge.py A B OUT --t 0.5 [--dtype bfloat16] [--max-shard-bytes N]
    python tools/slerp_merge.py A B OUT --config merge.yaml

Each tensor is one flat vector; with Ω the angle between A's and B's, the merge is
sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, or the lerp (1-t)·a + t·b when |cos Ω| > 0.9995 (nearly (anti)parallel)
or either norm is ~0 (mergekit would use Ω = 90° there). t = 0 gives A, t = 1 gives B. The maths is float32
(float64 for float64 tensors), norms and dot product accumulated in float64; the output keeps A's dtype unless
--dtype.

--config reads a mergekit YAML; only its top-level `parameters: {t: ...}` is used (models come from the command
line, `merge_method`, if given, must be slerp, slice-level parameters are refused). `t` is one of
  0.5                          # every tensor
  [0, 0.5, 1]                  # a gradient: anchors spread evenly over the layer depth, piecewise linear
  - filter: self_attn          # a list of entries: the first whose `filter` is a substring of the tensor name
    value: [0, 0.5, 0.3, 0.7, 1] #   (or that has no filter, or filter "*") gives the value, scalar or gradient
  - value: 0.5
all values in [0, 1]. Layer i of L (`model.layers.i.` in the name, L = num_hidden_layers of A's config.json) sits at
position i/(L-1) of a gradient (1 if L = 1). Tensors outside the layers sit where mergekit up to 0.1.1 put them
(the versions the 2024 SauerkrautLM merges ran): embeddings (a name containing "embed") at position 0, the rest
(final norm, lm_head) at 1, so they take the gradient's first and last anchors; mergekit >= 0.1.2 puts both at 0.

OUT gets A's config.json (its dtype updated by --dtype), tokenizer files and generation_config.json, and the
merged safetensors (sharded with an index above --max-shard-bytes). Only one tensor pair and one output shard
are in memory at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

from maxdpo.checkpoint.hf import DEFAULT_SHARD_BYTES, INDEX_FILE, read_hf_config, tensor_locations, write_shards
from maxdpo.checkpoint.safetensors_io import DTYPES, CheckpointError, SafetensorsFile

DOT_THRESHOLD = 0.9995  # mergekit's: above it the vectors count as colinear
EPS = 1e-8  # norms at or below it count as zero
CHUNK = 1 << 24  # elements per float64 slice of a reduction
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
FLOATS = {DTYPES[name] for name in ("F64", "F32", "F16", "BF16")}
OUT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
              "bfloat16": np.dtype(ml_dtypes.bfloat16)}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")

Setting = list[tuple[str | None, list[float]]]  # (filter or None for "any tensor", gradient anchors)


class MergeError(ValueError):
    """A bad t setting or merge config, or inputs that cannot be merged; the message names the culprit."""


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a·b accumulated in float64, a slice at a time so no full float64 copy is made."""
    return sum(float(np.dot(a[i:i + CHUNK].astype(np.float64), b[i:i + CHUNK].astype(np.float64)))
               for i in range(0, a.size, CHUNK))


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Spherical interpolation of two same-shape tensors seen as flat vectors (float32, or float64 for float64)."""
    work = np.float64 if np.dtype(np.float64) in (v0.dtype, v1.dtype) else np.float32
    a, b = np.asarray(v0, work).reshape(-1), np.asarray(v1, work).reshape(-1)
    norm0, norm1 = math.sqrt(_dot(a, a)), math.sqrt(_dot(b, b))
    s0, s1 = 1 - t, t
    if norm0 > EPS and norm1 > EPS:
        cos = min(1.0, max(-1.0, _dot(a, b) / (norm0 * norm1)))
        if abs(cos) <= DOT_THRESHOLD:
            omega = math.acos(cos)
            s0, s1 = math.sin(omega - omega * t) / math.sin(omega), math.sin(omega * t) / math.sin(omega)
    out = s0 * a
    out += s1 * b
    return out.reshape(v0.shape)


def parse_t(raw, where: str = "t") -> Setting:
    """Validates a mergekit `t` setting (scalar, gradient, or list of {filter, value} entries)."""
    def anchors(value, at: str) -> list[float]:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise MergeError(f"{at} must be a number or a non-empty list of numbers, not {value!r}")
        if not all(0 <= v <= 1 for v in values):
            raise MergeError(f"{at} = {value!r} lies outside [0, 1]")
        return [float(v) for v in values]

    entries = [raw] if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        return [(None, anchors(raw, where))]
    setting = []
    for i, entry in enumerate(entries):
        if "value" not in entry or set(entry) - {"filter", "value"}:
            raise MergeError(f"{where}[{i}] must have a 'value' and at most a 'filter', not {sorted(entry)}")
        name = entry.get("filter")
        if name is not None and not isinstance(name, str):
            raise MergeError(f"{where}[{i}].filter must be a string, not {name!r}")
        setting.append((None if name == "*" else name, anchors(entry["value"], f"{where}[{i}].value")))
    return setting


def load_setting(path: str | Path) -> Setting:
    """The `parameters.t` setting of a mergekit YAML file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise MergeError(f"cannot read merge config {path}: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("parameters"), dict) or "t" not in doc["parameters"]:
        raise MergeError(f"merge config {path} has no top-level 'parameters: {{t: ...}}'")
    if doc.get("merge_method", "slerp") != "slerp":
        raise MergeError(f"merge config {path} asks for merge_method '{doc['merge_method']}'; this tool does slerp")
    if any(isinstance(s, dict) and "parameters" in s for s in doc.get("slices") or []):
        raise MergeError(f"merge config {path} has slice-level parameters; put t under the top-level 'parameters'")
    return parse_t(doc["parameters"]["t"], f"{path}: parameters.t")


def position(name: str, num_layers: int | None) -> float:
    """Where tensor `name` sits along a gradient: i/(L-1) in layer i, 0 for embeddings, 1 for the other tensors."""
    match = LAYER.search(name)
    if match is None:
        return 0.0 if "embed" in name else 1.0
    if num_layers is None:
        raise MergeError(f"tensor '{name}' is in a layer but config.json has no num_hidden_layers")
    layer = int(match[1])
    if layer >= num_layers:
        raise MergeError(f"tensor '{name}' is in layer {layer} but config.json has num_hidden_layers={num_layers}")
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def t_for(name: str, setting: Setting, num_layers: int | None) -> float:
    """The t of tensor `name`: the first matching entry's value at the tensor's position, as mergekit evaluates it."""
    for pattern, anchors in setting:
        if pattern is None or pattern in name:
            scaled = position(name, num_layers) * (len(anchors) - 1) if len(anchors) > 1 else 0.0
            i0 = int(scaled)
            i1, frac = min(len(anchors) - 1, i0 + 1), scaled - i0
            return (1 - frac) * anchors[i0] + frac * anchors[i1]
    raise MergeError(f"no entry of t matches tensor '{name}'; add an entry without a filter as the default")


def tensor_files(folder: Path) -> dict[str, SafetensorsFile]:
    """Each tensor of an HF folder and the (lazily read) file holding it; every indexed name must be there."""
    locations = tensor_locations(folder)
    files = {path: SafetensorsFile(path) for path in set(locations.values())}
    for name, path in locations.items():
        if name not in files[path].entries:
            raise CheckpointError(f"tensor '{name}' named in {folder / INDEX_FILE} is not in {path}")
    return {name: files[path] for name, path in locations.items()}


def merge_tensor(name: str, t: float, x0: np.ndarray, x1: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The slerp of float tensors in `dtype`; other tensors (integer buffers) must agree and are copied."""
    if x0.dtype in FLOATS and x1.dtype in FLOATS:
        return slerp(t, x0, x1).astype(dtype, copy=False)
    if not np.array_equal(x0, x1):
        raise MergeError(f"tensor '{name}' is {x0.dtype}/{x1.dtype}, not floating point, and differs between A and B")
    return np.array(x0)


def merge(a: str | Path, b: str | Path, out: str | Path, setting: Setting, dtype: str | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes the SLERP merge of HF folders `a` and `b` to `out`; everything is checked before anything is written."""
    a, b, out = Path(a), Path(b), Path(out)
    config = read_hf_config(a)
    files_a, files_b = tensor_files(a), tensor_files(b)
    dtypes = {}
    for name, file in files_a.items():
        if name not in files_b:
            raise MergeError(f"tensor '{name}' of {file.path} is missing from {b}")
        x0, x1 = file.get(name), files_b[name].get(name)  # lazy maps; this checks dtypes and offsets
        if x0.shape != x1.shape:
            raise MergeError(f"tensor '{name}' has shape {x0.shape} in {file.path} "
                             f"but {x1.shape} in {files_b[name].path}")
        dtypes[name] = OUT_DTYPES[dtype] if dtype and x0.dtype in FLOATS else x0.dtype
    if extra := sorted(files_b.keys() - files_a.keys()):
        raise MergeError(f"{len(extra)} tensor(s) of {b}, e.g. '{extra[0]}', are missing from {a}")
    ts = {name: t_for(name, setting, config.get("num_hidden_layers")) for name in files_a}
    sizes = [math.prod(files_a[name].shape(name)) * dtypes[name].itemsize for name in files_a]
    out.mkdir(parents=True, exist_ok=True)
    if old := sorted(out.glob("*.safetensors")) + sorted(out.glob(INDEX_FILE)):
        raise MergeError(f"{out} already holds weights ({old[0].name}); give an empty or new folder")
    merged = ((name, merge_tensor(name, ts[name], files_a[name].get(name), files_b[name].get(name), dtypes[name]))
              for name in files_a)  # one tensor at a time
    write_shards(out, merged, sizes, max_shard_bytes)
    if dtype:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in COPIED_FILES:
        if (a / file).is_file():
            shutil.copyfile(a / file, out / file)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="HF model folder at t = 0 (mergekit's base_model)")
    parser.add_argument("b", help="HF model folder at t = 1")
    parser.add_argument("out", help="output folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--t", type=float, help="one t for every tensor")
    source.add_argument("--config", help="mergekit YAML whose parameters.t is used")
    parser.add_argument("--dtype", choices=sorted(OUT_DTYPES), help="output dtype of float tensors (default: A's)")
    parser.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES)
    args = parser.parse_args(argv)
    try:
        setting = load_setting(args.config) if args.config else parse_t(args.t, "--t")
        out = merge(args.a, args.b, args.out, setting, args.dtype, args.max_shard_bytes)
    except (MergeError, CheckpointError) as err:
        print(f"slerp_merge: error: {err}", file=sys.stderr)
        return 1
    print(f"merged {args.a} and {args.b} into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
