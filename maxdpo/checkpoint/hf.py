"""Hugging Face checkpoints <-> maxdpo parameters, streamed one tensor at a time.

Reading fills one preallocated array per (stacked) parameter; writing emits HF tensors into shards of
bounded size, so neither direction holds the model twice in host memory.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from maxdpo.atomic import write_text
from maxdpo.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from maxdpo.export_folder import export_folder
from maxdpo.models.family import Family, ParamEntry
from maxdpo.models.registry import family_for_model_type, get_family
from maxdpo.models.spec import Architecture, Execution
from maxdpo.models.transformer import Transformer, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def to_dtype(name: Any):
    return jnp.dtype(name) if name is not None else None


def read_hf_config(path: str | os.PathLike) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"model folder {path} has no config.json")
    try:
        with open(config_file) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # truncated or not JSON
        raise CheckpointError(f"{config_file} is not valid JSON ({err})") from err


def spec_from_pretrained(path: str | os.PathLike) -> tuple[Family, Architecture]:
    """The family and Architecture described by `path/config.json`."""
    config = read_hf_config(path)
    source = Path(path) / "config.json"
    try:
        family = family_for_model_type(config.get("model_type"), str(source))
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    try:
        return family, Architecture(family=family.name, **family.spec_from_hf(config))
    except KeyError as err:
        raise CheckpointError(f"{source} lacks the key {err} that a '{family.name}' model needs") from err
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from err


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _hf_to_ours(entry: ParamEntry, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if entry.linear_in_ndim is not None:
        tensor = tensor.T
    return tensor.reshape(shape)


def _ours_to_hf(entry: ParamEntry, array: np.ndarray) -> np.ndarray:
    if entry.linear_in_ndim is None:
        return array
    fan_in = math.prod(array.shape[:entry.linear_in_ndim])
    return np.ascontiguousarray(array.reshape(fan_in, -1).T)


def tensor_locations(folder: Path) -> dict[str, Path]:
    """The file holding each tensor of an HF folder: one model.safetensors, or an index and its shards."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"unreadable index {index_file}: {err}") from err
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).keys()}
    raise CheckpointError(f"model folder {folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


class CheckpointReader:
    """The tensors of one HF folder (single file or index + shards), memory-mapped, converted to our layout.

    Every tensor's presence and shape is checked up front, before anything is read or allocated.
    """

    def __init__(self, path: str | os.PathLike, spec: Architecture, family: Family, param_dtype):
        self.path, self.spec, self.family = Path(path), spec, family
        self.locations = tensor_locations(self.path)
        self.opened: dict[Path, SafetensorsFile] = {}
        self.shapes = abstract_model(spec, Execution(param_dtype=param_dtype))[1]
        for entry in family.param_entries(spec):
            for _, name in entry.tensors(spec):
                self._check(entry, name)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.locations:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint in {self.path}")
        file = self.locations[name]
        if file not in self.opened:
            if not file.is_file():
                raise CheckpointError(f"shard {file} named in {self.path / INDEX_FILE} does not exist")
            self.opened[file] = SafetensorsFile(file)
        return self.opened[file]

    def target(self, entry: ParamEntry) -> jax.ShapeDtypeStruct:
        return _get_path(self.shapes, entry.path)

    def tensor_shape(self, entry: ParamEntry) -> tuple[int, ...]:
        return self.target(entry).shape[len(entry.indexed_axes):]

    def _check(self, entry: ParamEntry, name: str) -> None:
        file, shape = self._file(name), self.tensor_shape(entry)
        if name not in file.entries:
            raise CheckpointError(f"tensor '{name}' is missing from {file.path}")
        found = file.shape(name)
        if math.prod(found) != math.prod(shape) or (entry.linear_in_ndim is None and found != shape):
            raise CheckpointError(f"tensor '{name}' in {file.path} has shape {found}, which does not fit "
                                  f"{shape} for {self.family.name} with this config.json")

    def read(self, entry: ParamEntry, name: str) -> np.ndarray:
        """One HF tensor in our layout and the parameter dtype."""
        tensor = self._file(name).get(name)
        return _hf_to_ours(entry, np.asarray(tensor, dtype=self.target(entry).dtype), self.tensor_shape(entry))

    def read_blocks(self, entry: ParamEntry, indices: list[tuple[slice, ...]]) -> list[np.ndarray]:
        """The blocks `indices` of our (stacked) array. Each HF tensor is read at most once, and only if a
        block overlaps it (a process holding experts 0-1 never reads experts 2-7)."""
        target = self.target(entry)
        num_indexed = len(entry.indexed_axes)
        ranges = [[range(*s.indices(size)) for s, size in zip(index, target.shape)] for index in indices]
        blocks = [np.empty([len(r) for r in block_ranges], target.dtype) for block_ranges in ranges]
        for source_index, name in entry.tensors(self.spec):
            tensor = None
            for index, block_ranges, block in zip(indices, ranges, blocks):
                lead = block_ranges[:num_indexed]
                if all(i in r for i, r in zip(source_index, lead)):
                    tensor = self.read(entry, name) if tensor is None else tensor
                    offset = tuple(r.index(i) for i, r in zip(source_index, lead))
                    block[offset] = tensor[index[num_indexed:]]
        return blocks


def load_params(path: str | os.PathLike, spec: Architecture, family: Family, param_dtype=jnp.float32) -> dict:
    """Nested dict of numpy arrays in `param_dtype`, read tensor by tensor into one array per parameter."""
    reader = CheckpointReader(path, spec, family, param_dtype)
    params: dict = {}
    entries = family.param_entries(spec)
    for entry in tqdm(entries, desc=f"loading {Path(path).name}", unit="tensors",
                      disable=jax.process_index() != 0 or len(entries) < 16):
        target = reader.target(entry)
        array = np.empty(target.shape, target.dtype)
        for index, name in entry.tensors(spec):
            array[index] = reader.read(entry, name)
        _set_path(params, entry.path, array)
    return params


def load_params_sharded(path: str | os.PathLike, spec: Architecture, family: Family, shardings: dict,
                        param_dtype) -> dict:
    """Parameters in `param_dtype` placed straight onto their shards: each process reads only the tensors its
    devices need and keeps only its own blocks, so no host ever holds the whole model."""
    reader = CheckpointReader(path, spec, family, param_dtype)
    params: dict = {}
    entries = family.param_entries(spec)
    for entry in tqdm(entries, desc=f"loading {Path(path).name}", unit="tensors",
                      disable=jax.process_index() != 0 or len(entries) < 16):
        shape, sharding = reader.target(entry).shape, _get_path(shardings, entry.path)
        unique = {_block_key(index, shape): index
                  for index in sharding.addressable_devices_indices_map(shape).values()}
        blocks = dict(zip(unique, reader.read_blocks(entry, list(unique.values()))))
        array = jax.make_array_from_callback(shape, sharding, lambda index: blocks[_block_key(index, shape)])
        _set_path(params, entry.path, array)
    return params


def _block_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    """Hashable form of a device's block; devices holding replicas of one block share one read."""
    return tuple(s.indices(size) for s, size in zip(index, shape))


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", param_dtype: str = "float32",
                    **runtime) -> Transformer:
    """A Transformer with the weights of the HF folder `path` (family from its config.json); `runtime` sets the
    other `Execution` fields (attention, moe_impl, remat, scan_layers, logits_chunk)."""
    family, spec = spec_from_pretrained(path)
    execution = Execution(dtype=to_dtype(dtype), param_dtype=to_dtype(param_dtype), **runtime)
    params = load_params(path, spec, family, execution.param_dtype)
    return nnx.merge(abstract_model(spec, execution)[0], jax.tree.map(jnp.asarray, params))


def hf_config_dict(spec: Architecture, family: Family, dtype) -> dict:
    return {"architectures": [family.architecture], "model_type": family.model_types[0],
            "dtype": jnp.dtype(dtype).name, **family.hf_config(spec)}


def _hf_tensors(spec: Architecture, family: Family, params: dict, dtype):
    """Yields (hf_name, numpy array) one tensor at a time."""
    for entry in family.param_entries(spec):
        array = _get_path(params, entry.path)
        for index, name in entry.tensors(spec):
            yield name, _ours_to_hf(entry, np.asarray(array[index]).astype(dtype))


def write_shards(out: Path, tensors: Iterable[tuple[str, np.ndarray]], sizes: list[int],
                 max_shard_bytes: int) -> None:
    """Writes (name, array) pairs, produced one at a time, into safetensors shards of at most
    `max_shard_bytes` planned from their byte `sizes` (in the same order), with an index when more than one.
    Only one shard's tensors are held at a time."""
    shard_of, shard, used = [], 0, 0
    for size in sizes:
        if used and used + size > max_shard_bytes:
            shard, used = shard + 1, 0
        shard_of.append(shard)
        used += size
    num_shards = shard + 1
    names = [SINGLE_FILE] if num_shards == 1 else [
        f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map, pending, current = {}, [], 0
    for (name, tensor), shard_index in zip(tensors, shard_of):
        if shard_index != current:
            write_safetensors(out / names[current], pending, {"format": "pt"})
            pending, current = [], shard_index
        pending.append((name, tensor))
        weight_map[name] = names[shard_index]
    write_safetensors(out / names[current], pending, {"format": "pt"})
    if num_shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        write_text(out / INDEX_FILE, json.dumps(index, indent=2))


def save_params(spec: Architecture, params: dict, out_dir: str | os.PathLike, dtype: Optional[str] = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes config.json and safetensors shards (with an index when more than one) to `out_dir`, in `dtype`
    (default: the parameters' own)."""
    family = get_family(spec.family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(to_dtype(dtype) or np.result_type(*(leaf.dtype for leaf in jax.tree.leaves(params))))
    shapes = abstract_model(spec)[1]
    sizes = []  # plan shards from shapes alone
    for entry in family.param_entries(spec):
        shape = _get_path(shapes, entry.path).shape
        tensors = entry.tensors(spec)
        sizes += [math.prod(shape) // len(tensors) * np_dtype.itemsize] * len(tensors)
    write_shards(out, _hf_tensors(spec, family, params, np_dtype), sizes, max_shard_bytes)
    write_text(out / "config.json", json.dumps(hf_config_dict(spec, family, np_dtype), indent=2))
    return out


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, dtype: Optional[str] = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """HF folder (config.json + safetensors) that `transformers.AutoModelForCausalLM` loads; it replaces a
    previous export in `out_dir` whole (`export_folder`)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with export_folder(out_dir) as staging:
        save_params(model.spec, params, staging, dtype, max_shard_bytes)
    return Path(out_dir)
