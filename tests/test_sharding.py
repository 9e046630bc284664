"""Data, fsdp and tensor parallel layouts on the 8-device CPU mesh give the single-device loss curve."""
import json

import jax
import numpy as np
import pytest

from maxdpo.config import load_config
from maxdpo.sharding import logical_to_spec, make_mesh, mesh_shape
from maxdpo.trainer import Trainer

LAYOUTS = {
    "data": ["mesh.data=8"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=8"],
    "data+fsdp+tensor": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "fsdp+tensor4": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
}
COMMON = ["trainer.max_steps=3", "trainer.batch_size=8", "trainer.log_every=1", "trainer.save_every=0",
          "data.eval=null", "export.hf=false", "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0"]


def _run(tmp_path, name, overrides, devices=None):
    cfg = load_config(None, COMMON + [f"run.output_dir={tmp_path / name}"] + overrides)
    Trainer(cfg, devices).train()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r["loss"], r["rewards/margins"], r["grad_norm"]] for r in rows])


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return _run(tmp, "one", ["mesh.data=1"], devices=jax.devices()[:1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(tmp_path, single_device, layout):
    curve = _run(tmp_path, layout, LAYOUTS[layout])
    assert curve.shape == single_device.shape == (3, 3)
    np.testing.assert_allclose(curve, single_device, rtol=2e-4, atol=2e-5)


def test_mesh_fill_and_errors():
    cfg = load_config(None, ["mesh.data=-1", "mesh.tensor=2"])
    assert mesh_shape(cfg.mesh, 8) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="product"):
        mesh_shape(load_config(None, ["mesh.data=3"]).mesh, 8)


def test_logical_rules_map_and_skip_indivisible():
    cfg = load_config(None, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"])
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.logical_axis_rules
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), rules, mesh, (3, 128, 4, 16))
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    spec = logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), rules, mesh, (3, 128, 2, 16))
    assert tuple(spec) == (None, "fsdp", None, None)  # 2 kv heads do not split 4 ways
