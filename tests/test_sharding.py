"""Data, fsdp and tensor parallel layouts on the 8-device CPU mesh give the single-device loss curve."""

import jax
import numpy as np
import pytest

from maxdpo.configure import load_config
from maxdpo.kernels import partitioning
from maxdpo.kernels.partitioning import logical_to_spec
from maxdpo.sharding import make_mesh, mesh_context, mesh_shape
from programs import train_steps

LAYOUTS = {
    "data": ["mesh.data=8"],
    "fsdp": ["mesh.data=1", "mesh.fsdp=8"],
    "data+fsdp+tensor": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "fsdp+tensor4": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4"],
}
COMMON = ["trainer.max_steps=3", "trainer.batch_size=8", "data.eval=null", "optimizer.learning_rate=1e-2",
          "optimizer.warmup_ratio=0"]


# The bundled tiny Llama shape, changed into each family (windows shorter than the 32-token rows).
FAMILIES = {
    "mistral": ["model.family=mistral", "model.overrides.sliding_window=8"],
    "mixtral": ["model.family=mixtral", "model.overrides.num_experts=4", "model.overrides.num_experts_per_tok=2",
                "model.overrides.sliding_window=12", "dpo.router_aux_coef=0.05"],
    "gemma": ["model.family=gemma", "model.overrides.num_kv_heads=1", "model.overrides.head_dim=24"],
    "gemma2": ["model.family=gemma2", "model.overrides.sliding_window=8", "model.overrides.attn_logit_softcap=5.0",
               "model.overrides.final_logit_softcap=3.0", "model.overrides.query_pre_attn_scalar=24"],
}
FAMILY_LAYOUTS = {
    "data": ["mesh.data=8"],
    "fsdp+tensor": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    "data+expert": ["mesh.data=2", "mesh.expert=4"],
}


def _run(overrides, devices=None):
    rows, _ = train_steps(load_config(None, COMMON + overrides), devices)
    names = ["loss", "rewards/margins", "grad_norm"] + (["aux_loss"] if "aux_loss" in rows[0] else [])
    return np.array([[r[n] for n in names] for r in rows])


@pytest.fixture(scope="module")
def single_device():
    return _run(["mesh.data=1"], devices=jax.devices()[:1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(single_device, layout):
    curve = _run(LAYOUTS[layout])
    assert curve.shape == single_device.shape == (3, 3)
    np.testing.assert_allclose(curve, single_device, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loss_is_the_same_under_every_layout(family):
    """Every family under data and fsdp+tensor layouts; Mixtral also runs the ragged experts with experts sharded
    4 ways (the dense reference elsewhere)."""
    curves = {}
    for layout, mesh in FAMILY_LAYOUTS.items():
        if layout == "data+expert" and family != "mixtral":
            continue  # without experts the expert axis is one more data axis, which the llama layouts cover
        impl = ["model.moe_impl=ragged"] if layout == "data+expert" else []
        curves[layout] = _run(FAMILIES[family] + mesh + impl)
    assert curves["data"].shape[0] == 3
    assert (curves["data"].shape[1] == 4) == (family == "mixtral")  # aux_loss logged for MoE only
    # the policy moves away from the reference (3 steps of different batches are too few to ask for a sign)
    assert np.all(np.abs(curves["data"][1:, 1]) > 1e-4)
    for layout in set(curves) - {"data"}:
        np.testing.assert_allclose(curves[layout], curves["data"], rtol=2e-4, atol=2e-5, err_msg=layout)


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
    expert_mesh = make_mesh(load_config(None, ["mesh.data=2", "mesh.expert=4"]).mesh)
    spec = logical_to_spec(("layers", "experts", "embed", "mlp"), rules, expert_mesh, (3, 8, 128, 256))
    assert tuple(spec) == (None, "expert", None, None)
    # FSDP splits expert weights by expert where the count divides, else along embed
    fsdp_mesh = make_mesh(load_config(None, ["mesh.data=2", "mesh.expert=2", "mesh.fsdp=2"]).mesh)
    spec = logical_to_spec(("layers", "experts", "embed", "mlp"), rules, fsdp_mesh, (3, 8, 128, 256))
    assert tuple(spec) == (None, ("expert", "fsdp"), None, None)
    spec = logical_to_spec(("layers", "experts", "embed", "mlp"), rules, fsdp_mesh, (3, 6, 128, 256))
    assert tuple(spec) == (None, "expert", "fsdp", None)


def test_mesh_context_sets_the_mesh_and_the_rules_the_kernels_read():
    cfg = load_config(None, ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4", "mesh.logical_axis_rules.batch=[fsdp]"])
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.logical_axis_rules
    with mesh_context(mesh, rules):
        assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
        assert dict(partitioning.current_rules()) == rules
        assert partitioning.kernel_axes(mesh, ("batch", "mlp"), (8, 64)) == (("fsdp",), ("tensor",))
    assert partitioning.current_rules() is partitioning.DEFAULT_RULES


def test_kernel_default_rules_are_the_bundled_ones():
    """Kernels traced outside `logical_rules` (tests, notebooks) split as the bundled config does."""
    rules = load_config(None, []).mesh.logical_axis_rules
    assert {name: tuple(rules[name]) for name in partitioning.DEFAULT_RULES} == dict(partitioning.DEFAULT_RULES)
