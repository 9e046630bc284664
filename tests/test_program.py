"""The one train program: its abstract arguments are the real ones, its knowledge lives in one place each."""
import ast
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from maxdpo.checkpoint.hf import hf_config_dict
from maxdpo.config import ConfigError, resume_free_keys
from maxdpo.configure import load_config
from maxdpo.data.batch import Batch, PAIRED, SHARED, collate
from maxdpo.data.prefix_sharing import collate_shared
from maxdpo.data.tokenize import TokenizedPair
from maxdpo.dpo.losses import LOSSES
from maxdpo.model_card import render
from maxdpo.models.registry import FAMILIES
from maxdpo.models.spec import Architecture
from maxdpo.program import build_train_program
from maxdpo.resume import check_architecture
from maxdpo.sharding import make_mesh
from maxdpo.weights import init_params

ROOT = Path(__file__).parents[1]


def _pair(prompt, completion, seed):
    ids = np.random.default_rng(seed).integers(3, 60, prompt + completion, dtype=np.int32)
    rejected = ids.copy()
    rejected[prompt:] += 1
    return TokenizedPair(ids, rejected, prompt, prompt)


@pytest.mark.parametrize("layout", [PAIRED, SHARED])
@pytest.mark.parametrize("ref_logps", [False, True])
def test_abstract_batch_is_the_collated_batch(layout, ref_logps):
    """Batch.abstract gives the pytree, shapes and dtypes the collate functions produce (what compile lowers)."""
    rows = [[_pair(5, 4, 0), _pair(3, 2, 1)], [_pair(4, 3, 2)], []]
    batch = (collate_shared if layout == SHARED else collate)(rows, 32, 2, pad_id=0)
    if ref_logps:
        batch = batch.replace(ref_logps=np.zeros((3, 2, 2), np.float32))
    abstract = Batch.abstract(layout, rows=3, length=32, slots=2, ref_logps=ref_logps)
    assert jax.tree.structure(abstract) == jax.tree.structure(batch)
    assert jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), abstract) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), batch)
    assert batch.layout == layout and batch.shared == (layout == SHARED)


@pytest.mark.parametrize("overrides", [["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                                       ["mesh.data=1", "mesh.fsdp=8", "freeze.frozen=['model\\.embed_tokens']"]])
def test_placed_state_has_the_abstract_state_shapes_and_shardings(overrides):
    cfg = load_config(None, overrides)
    program = build_train_program(cfg, make_mesh(cfg.mesh), total_steps=10)
    state = program.init_state(init_params(program, seed=0))
    assert jax.tree.structure(state) == jax.tree.structure(program.abstract_state)
    for placed, abstract in zip(jax.tree.leaves(state), jax.tree.leaves(program.abstract_state)):
        assert placed.shape == abstract.shape and placed.dtype == abstract.dtype
        assert placed.sharding.is_equivalent_to(abstract.sharding, placed.ndim)
    embed = program.param_shardings["layers"]["mlp"]["gate_proj"].spec
    assert "fsdp" in jax.tree.leaves(tuple(embed))  # parameters really are split over fsdp


@pytest.mark.parametrize("family", list(FAMILIES))
def test_architecture_round_trips_config_json_and_checkpoint_meta(family):
    spec = FAMILIES[family].default_spec
    written = json.loads(json.dumps(hf_config_dict(spec, FAMILIES[family], np.float32)))
    assert Architecture(family=family, **FAMILIES[family].spec_from_hf(written)) == spec
    assert Architecture.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_changed_architecture_is_not_resumed():
    spec = FAMILIES["llama"].default_spec
    check_architecture({"model": spec.to_dict()}, spec, "checkpoint 5")
    with pytest.raises(ConfigError, match=r"checkpoint 5 holds a different model architecture \(num_layers: 32 -> 4\)"):
        check_architecture({"model": spec.to_dict()}, spec.replace(num_layers=4), "checkpoint 5")


def test_resume_free_keys_are_where_and_how_not_what():
    free = resume_free_keys()
    assert {"model.remat", "model.attention", "trainer.save_every", "mesh.", "export."} <= set(free)
    trained = ["model.dtype", "model.param_dtype", "dpo.beta", "optimizer.learning_rate", "trainer.batch_size",
               "data.max_length", "freeze.trainable", "run.seed"]
    assert not [key for key in trained if key.startswith(free)]


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_validates_and_has_its_model_card_from_its_record(name):
    loss = LOSSES[name]
    settings = [f"dpo.loss={name}"] + [f"dpo.{key}=0.01" for key in loss.requires]
    card = render(load_config(None, settings), [], {"data": 1}, 1)
    assert loss.title in card
    for key in loss.requires:
        with pytest.raises(ConfigError, match=f"dpo.loss '{name}' needs dpo.{key} > 0"):
            load_config(None, [f"dpo.loss={name}"])
    if "label_smoothing" not in loss.reads:
        with pytest.raises(ConfigError, match="'dpo.label_smoothing' is used by the losses"):
            load_config(None, [f"dpo.loss={name}", "dpo.label_smoothing=0.1"])
    if not loss.needs_reference:
        with pytest.raises(ConfigError, match="trains without a reference model"):
            load_config(None, [f"dpo.loss={name}", "reference.precompute=true"])


def test_config_imports_nothing_of_maxdpo():
    tree = ast.parse((ROOT / "maxdpo" / "config.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.startswith("maxdpo")]


def test_the_program_is_assembled_in_one_module():
    """Only maxdpo/program.py jits the steps and computes the micro batch; the rest call it."""
    def grep(pattern):
        out = subprocess.run(["git", "grep", "-n", pattern, "--", "maxdpo", "kernels", "tools"], cwd=ROOT,
                             capture_output=True, text=True).stdout
        code = [line for line in out.splitlines() if 'f"' not in line]  # not an error message naming the keys
        return sorted({line.split(":")[0] for line in code})
    assert grep("make_train_step(") == ["maxdpo/dpo/step.py", "maxdpo/program.py"]
    assert grep("micro_batch_size or") == ["maxdpo/config.py"]
    assert grep("optimizer_state_shardings(") == ["maxdpo/dpo/optim.py", "maxdpo/program.py"]
