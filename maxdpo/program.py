"""The run's jitted program, assembled in one place: `build_train_program(cfg, mesh, total_steps)`.

From the config and the mesh: the architecture and how to execute it, the parameter, optimizer-state and
batch shardings, the trainable split, the loss settings, the optimizer, and the jitted train, eval and
reference-logps steps. The trainer runs it, `python -m maxdpo.compile` lowers it with `abstract_args`,
`tools/bench.py` times it. Building it reads no weights and no data.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from maxdpo.checkpoint.hf import spec_from_pretrained, to_dtype
from maxdpo.config import Config, ConfigError
from maxdpo.data.batch import Batch, layout_of, longest_row
from maxdpo.data.sources import resolve_path
from maxdpo.dpo.freeze import TrainableSplit, adapter_split, trainable_split
from maxdpo.dpo.losses import LossHyper, loss_record
from maxdpo.dpo.optim import make_optimizer, optimizer_state_shardings
from maxdpo.dpo.unpaired import initial_moments
from maxdpo.dpo.step import LossSettings, ReferenceSync, make_eval_step, make_reference_logps, make_train_step
from maxdpo.models.layers import is_norm_scale
from maxdpo.models.lora import plan as lora_plan
from maxdpo.models.registry import get_family
from maxdpo.models.spec import Architecture, Execution
from maxdpo.models.transformer import abstract_model
from maxdpo.sharding import batch_sharding, mesh_context, micro_batch_parallel_size, replicated, tree_shardings


def execution_from_config(cfg: Config, spec: Optional[Architecture] = None) -> Execution:
    """How `cfg` runs its model; `spec` (needed with LoRA) says which weights the adapter targets match."""
    model = cfg.model
    lora = lora_plan(spec, get_family(spec.family), cfg.lora) if cfg.lora.rank else None
    return Execution(dtype=to_dtype(model.dtype), param_dtype=to_dtype(model.param_dtype), attention=model.attention,
                     moe_impl=model.moe_impl, remat=model.remat, scan_layers=model.scan_layers,
                     logits_chunk=model.logits_chunk, lora=lora, quantize=cfg.lora.quantize)


def architecture_from_config(cfg: Config) -> Architecture:
    """From `model.path`'s config.json, or the family's default architecture with `model.overrides`."""
    if cfg.model.path:
        family, spec = spec_from_pretrained(resolve_path(cfg.model.path))
        if family.name != cfg.model.family:
            raise ConfigError(f"model.family is '{cfg.model.family}' but {cfg.model.path} holds a '{family.name}' model")
        if cfg.model.overrides:
            raise ConfigError("model.overrides applies to random init only; remove it or set model.path: null")
        return spec
    family = get_family(cfg.model.family)
    overrides = dict(cfg.model.overrides)
    unknown = set(overrides) - set(Architecture.field_names())
    if unknown:
        raise ConfigError(f"unknown key(s) in model.overrides: {sorted(unknown)}; valid: {list(Architecture.field_names())}")
    if family.default_layer_types and "layer_types" not in overrides:
        overrides["layer_types"] = family.default_layer_types(overrides.get("num_layers", family.default_spec.num_layers))
    try:
        return family.default_spec.replace(**overrides)
    except ValueError as err:
        raise ConfigError(f"model.overrides: {err}") from err


def loss_settings(cfg: Config) -> LossSettings:
    dpo = cfg.dpo
    hyper = LossHyper(dpo.beta, dpo.label_smoothing, dpo.dpop_lambda, dpo.simpo_gamma, dpo.discopop_tau,
                      dpo.f_divergence_type, dpo.f_alpha_divergence_coef, dpo.desirable_weight,
                      dpo.undesirable_weight)
    return LossSettings(dpo.objective, hyper, dpo.sft_weight, dpo.router_aux_coef, dpo.ld_alpha, dpo.use_weighting)


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def reference_dtypes(params, compute_dtype):
    """The dtype each reference weight is kept in: matrices in the compute dtype when it is narrower than the
    parameters' (the forward casts them to it before every use, so the reference's logps are unchanged and
    its memory halves under bf16 compute); norm scales as stored (Gemma adds 1 to them in fp32)."""
    compute_dtype = jnp.dtype(compute_dtype)

    def dtype(path, leaf):
        narrower = compute_dtype.itemsize < jnp.dtype(leaf.dtype).itemsize
        return compute_dtype if narrower and not is_norm_scale(path) else jnp.dtype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(dtype, params)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything a run compiles, for one config on one mesh. State = {step, params, opt_state} (and `reference`
    when it moves, TR-DPO; `reward_moments`, BCO's running reward mean); the steps take (state or params,
    reference params or None, `Batch`; the eval step the reward moments or None too) and must be called under
    `mesh_context()`."""
    cfg: Config
    mesh: Mesh
    spec: Architecture
    execution: Execution
    graphdef: nnx.GraphDef
    split: TrainableSplit
    settings: LossSettings
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    layout: str  # batch.PAIRED or batch.SHARED
    reference_model: bool  # the steps run a reference model (the loss needs one and it is not precomputed)
    reference_sync: Optional[ReferenceSync]  # TR-DPO: the reference moves and is part of the state
    data_parallel: int  # devices a micro batch's rows are split over
    abstract_state: dict  # ShapeDtypeStructs with their shardings
    abstract_reference: Optional[dict]  # the reference weights' ShapeDtypeStructs (`reference_dtypes`), or None
    batch_sharding: NamedSharding  # every batch field: rows split over the `batch` rule
    train_step: Callable  # (state, ref_params, batch) -> (state, metrics)
    eval_step: Callable  # (params, ref_params, batch, reward_moments) -> metric sums
    reference_logps: Callable  # (ref_params, batch) -> [rows * slots, 2] summed reference logps, replicated

    @property
    def rules(self) -> dict:
        return self.cfg.mesh.logical_axis_rules

    @property
    def state_shardings(self) -> dict:
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

    @property
    def param_shardings(self) -> dict:
        return self.state_shardings["params"]

    def stored_weight_shardings(self) -> dict:
        """The shardings of the weights as an HF folder holds them: `param_shardings`, or with a quantised base
        (`lora.quantize`) those of the unquantised model, which loading quantises."""
        if not self.execution.quantize:
            return self.param_shardings
        _, abstract, axes = abstract_model(self.spec, dataclasses.replace(self.execution, quantize=None))
        return tree_shardings(abstract, axes, self.rules, self.mesh)

    def mesh_context(self):
        """The mesh and logical rules the steps are traced under (the kernels shard per device from them)."""
        return mesh_context(self.mesh, self.rules)

    def reference_weights(self, params: dict) -> dict:
        """`params` (placed like the policy) cast to the reference model's dtypes (`abstract_reference`); only
        for a program that runs a reference model."""
        cast = jax.jit(lambda tree: jax.tree.map(lambda x, a: x.astype(a.dtype), tree, self.abstract_reference),
                       out_shardings=self.param_shardings)
        return cast(params)

    def init_state(self, params: dict, ref_params: Optional[dict] = None) -> dict:
        """The state at step 0: `params` (already placed by `param_shardings`), fresh optimizer moments, and with
        `reference_sync` the reference weights `ref_params`."""
        opt_shardings = self.state_shardings["opt_state"]
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(self.split.trainable(params))
        step = jax.device_put(jnp.asarray(0, jnp.int32), self.state_shardings["step"])
        state = {"step": step, "params": params, "opt_state": opt_state}
        if self.reference_sync:
            state["reference"] = ref_params
        if "reward_moments" in self.abstract_state:
            state["reward_moments"] = jax.device_put(initial_moments(), self.state_shardings["reward_moments"])
        return state

    def abstract_batch(self, rows: int, length: int, slots: int = 1) -> Batch:
        """The train step's batch as ShapeDtypeStructs (rows x length tokens per side)."""
        batch = Batch.abstract(self.layout, rows, length, slots, ref_logps=self.cfg.reference.precompute,
                               labels=loss_record(self.settings.loss).unpaired)
        return _abstract(batch, jax.tree.map(lambda _: self.batch_sharding, batch))

    def abstract_args(self, rows: int, length: Optional[int] = None) -> tuple:
        """(state, reference params, batch) as ShapeDtypeStructs, for `train_step.lower(*args)`; the batch's
        rows are padded to `length` tokens (default: the longest row `data.max_length` allows)."""
        ref = self.abstract_reference if self.reference_model and not self.reference_sync else None
        length = length or longest_row(self.layout, self.cfg.data.max_length)
        return self.abstract_state, ref, self.abstract_batch(rows, length)

    def global_batch(self, batch: Batch) -> Batch:
        """This process's rows of a host batch -> global arrays on the mesh."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)


def check_layout(cfg: Config, mesh: Mesh, spec: Architecture) -> int:
    """Refuses a config whose model or batch does not fit this mesh; returns the data-parallel size."""
    if cfg.dpo.router_aux_coef and not spec.num_experts:
        raise ConfigError(f"dpo.router_aux_coef applies to MoE models; this {spec.family} model has no experts")
    return micro_batch_parallel_size(mesh, cfg.mesh.logical_axis_rules, cfg.trainer.micro_batch)


def build_train_program(cfg: Config, mesh: Mesh, total_steps: int,
                        spec: Optional[Architecture] = None) -> TrainProgram:
    """The program of `cfg` on `mesh`; `total_steps` sets the learning-rate schedule; `spec` is the
    architecture when the caller has read it already (else `architecture_from_config`)."""
    rules = cfg.mesh.logical_axis_rules
    spec = spec or architecture_from_config(cfg)
    execution = execution_from_config(cfg, spec)
    data_parallel = check_layout(cfg, mesh, spec)
    graphdef, abstract_params, axes = abstract_model(spec, execution)
    param_shardings = tree_shardings(abstract_params, axes, rules, mesh)
    params = _abstract(abstract_params, param_shardings)
    family = get_family(spec.family)
    split = (adapter_split(abstract_params, execution.lora) if execution.lora
             else trainable_split(spec, family, cfg.freeze))
    optimizer, schedule = make_optimizer(cfg.optimizer, total_steps, execution.param_dtype)
    trainable = split.trainable(params)
    scalar = replicated(mesh)
    opt_shardings = optimizer_state_shardings(optimizer, trainable, split.trainable(param_shardings), scalar)
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar), "params": params,
                      "opt_state": _abstract(jax.eval_shape(optimizer.init, trainable), opt_shardings)}
    settings = loss_settings(cfg)
    rows = batch_sharding(mesh, rules)
    # With LoRA the steps' reference is the policy's base (adapters off): no reference weights of its own.
    base_reference = settings.uses_reference and not cfg.reference.precompute and execution.lora is not None
    reference_model = settings.uses_reference and not cfg.reference.precompute and not base_reference
    abstract_reference = (jax.tree.map(lambda a, dtype: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding),
                                       params, reference_dtypes(params, execution.dtype))
                          if reference_model else None)
    ref_shardings: Optional[Any] = param_shardings if reference_model else None
    sync = ReferenceSync(cfg.reference.sync_steps, cfg.reference.mixup_alpha) if cfg.reference.sync_steps else None
    if sync:  # the moving reference is state: checkpointed, donated, updated by the step
        abstract_state["reference"] = abstract_reference
    if loss_record(settings.loss).anchor == "running_mean":  # BCO's running reward mean, moved by every step
        moments = jax.eval_shape(initial_moments)
        abstract_state["reward_moments"] = _abstract(moments, jax.tree.map(lambda _: scalar, moments))
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    train_step = jax.jit(make_train_step(graphdef, settings, optimizer, schedule, cfg.trainer.accumulation_steps,
                                         split, base_reference, sync),
                         in_shardings=(state_shardings, None if sync else ref_shardings, rows),
                         out_shardings=(state_shardings, scalar), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(graphdef, settings, base_reference),
                        in_shardings=(param_shardings, ref_shardings, rows, state_shardings.get("reward_moments")))
    reference_logps = jax.jit(make_reference_logps(graphdef), in_shardings=(param_shardings, rows),
                              out_shardings=scalar)
    return TrainProgram(cfg, mesh, spec, execution, graphdef, split, settings, optimizer, schedule,
                        layout_of(cfg.data.prefix_sharing), reference_model, sync, data_parallel, abstract_state,
                        abstract_reference, rows, train_step, eval_step, reference_logps)
