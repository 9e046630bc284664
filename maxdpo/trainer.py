"""The DPO training loop: feeds batches to the jitted step, logs, evaluates, checkpoints, exports."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from maxdpo import components
from maxdpo.checkpoint.hf import save_params, spec_from_pretrained
from maxdpo.checkpoint.state import CheckpointStore, abstract_like, latest_meta, spec_to_meta
from maxdpo.config import Config, ConfigError, save_config, to_dict
from maxdpo.data.sources import resolve_path
from maxdpo.data.loader import (BATCH_FIELDS, BatchBuilder, batch_iterator, batch_tokens, eval_schedule,
                                training_schedule)
from maxdpo.dpo import precompute
from maxdpo.dpo.freeze import trainable_split
from maxdpo.dpo.optim import make_optimizer, optimizer_state_shardings
from maxdpo.dpo.step import finalize_metrics, make_eval_step, make_reference_logps, make_train_step
from maxdpo.models.registry import get_family
from maxdpo.metrics_log import MetricsLog
from maxdpo.model_card import write_model_card
from maxdpo.sharding import batch_sharding, make_mesh, micro_batch_parallel_size, replicated

log = logging.getLogger("maxdpo")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or inf; the message names the step and batch."""


# Settings a resumed run may change: where things run and how often they are logged, saved and exported.
RESUME_FREE_KEYS = ("run.output_dir", "model.attention", "model.moe_impl", "model.remat", "model.scan_layers",
                    "model.logits_chunk",
                    "data.num_proc", "data.cache", "data.cache_dir", "trainer.eval_every", "trainer.save_every",
                    "trainer.log_every", "trainer.keep_checkpoints", "trainer.resume", "mesh.", "export.")


def _flat_config(content: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in content.items():
        if isinstance(value, dict) and not (prefix == "model." and key == "overrides"):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(cfg: Config, saved: dict, where: str) -> None:
    """Refuses to continue a run whose checkpoint was written under other training settings."""
    ours, theirs = _flat_config(to_dict(cfg)), _flat_config(saved)
    changed = [f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}" for key in sorted(set(ours) | set(theirs))
               if ours.get(key) != theirs.get(key) and not key.startswith(RESUME_FREE_KEYS)]
    if changed:
        raise ConfigError(f"{where} was written under a different config ({'; '.join(changed)}); resuming would not "
                          "continue the same run: restore those settings, choose another run.output_dir, or set "
                          "trainer.resume=never with a fresh folder")


def _write_config_atomically(cfg: Config, run_dir: Path) -> None:
    tmp = run_dir / "config.yaml.tmp"
    save_config(cfg, tmp)
    os.replace(tmp, run_dir / "config.yaml")


def _global_batch(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    return {name: jax.make_array_from_process_local_data(shardings[name], value) for name, value in batch.items()}


def _mean_rows(window: list[dict]) -> dict:
    """Averages the metrics of the steps since the last log (TRL's logging), learning rate as of the last step."""
    row = {name: float(np.mean([m[name] for m in window])) for name in window[0]}
    row["learning_rate"] = float(window[-1]["learning_rate"])
    return row


class Trainer:
    """One DPO run; `devices` (default: all) lets tests place the same run on a smaller mesh."""

    def __init__(self, cfg: Config, devices: list[jax.Device] | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir).absolute()
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(cfg.mesh, devices)
        self.rules = cfg.mesh.logical_axis_rules
        trainer = cfg.trainer
        micro = trainer.micro_batch_size or trainer.batch_size
        self.num_micro = trainer.batch_size // micro
        self.data_parallel = micro_batch_parallel_size(self.mesh, self.rules, micro)
        if not cfg.data.train:
            raise ConfigError("data.train is not set")
        newest = latest_meta(self.run_dir / "checkpoints")
        self.latest, self.resume_meta = newest if newest is not None else (None, None)
        if newest is not None and trainer.resume == "never":
            raise ConfigError(f"{self.run_dir} already holds checkpoints (newest step {self.latest}) and "
                              "trainer.resume is 'never'; choose another run.output_dir or set trainer.resume=auto")
        if newest is not None:
            check_resumable(cfg, self.resume_meta["config"], f"checkpoint {self.run_dir / 'checkpoints' / str(self.latest)}")

        self.tokenizer = components.load_tokenizer(cfg)
        self.spec = components.build_spec(cfg)
        components.check_vocab(self.spec, self.tokenizer)
        log.info("model: %s, %.2fM parameters, %d layers; mesh %s; process %d of %d", self.spec.family,
                 self.spec.num_params() / 1e6, self.spec.num_layers, dict(self.mesh.shape), jax.process_index(),
                 jax.process_count())
        process = dict(process_index=jax.process_index(), process_count=jax.process_count())
        plan = components.batch_plan(cfg, self.tokenizer)
        train_data = components.prepare_data(cfg.data.train, cfg.data.train_split, cfg, self.tokenizer)
        self.batch_schedule = training_schedule(train_data.store, plan)
        self.train_batches = BatchBuilder(train_data.store, self.batch_schedule, plan.pad_id,
                                          prefix_sharing=plan.prefix_sharing, **process)
        self.data_fingerprint = components.schedule_fingerprint(train_data, plan)
        self.data_fingerprints = {"train": train_data.fingerprint}
        self.total_steps = len(self.batch_schedule) if trainer.max_steps < 0 else min(trainer.max_steps, len(self.batch_schedule))
        self.eval_batches = None
        if cfg.data.eval:
            eval_plan = components.batch_plan(cfg, self.tokenizer, shuffle=False, batch_size=micro)
            eval_data = components.prepare_data(cfg.data.eval, cfg.data.eval_split, cfg, self.tokenizer)
            self.eval_batches = BatchBuilder(eval_data.store, eval_schedule(eval_data.store, eval_plan),
                                             eval_plan.pad_id, prefix_sharing=plan.prefix_sharing, **process)
            self.data_fingerprints["eval"] = eval_data.fingerprint

        self.graphdef, _, self.param_shardings = components.param_shardings(self.spec, self.mesh, self.rules)
        if cfg.dpo.router_aux_coef and not self.spec.num_experts:
            raise ConfigError(f"dpo.router_aux_coef applies to MoE models; this {self.spec.family} model has no experts")
        self.split = trainable_split(self.spec, get_family(self.spec.family), cfg.freeze)
        settings = components.loss_settings(cfg)
        self.optimizer, self.schedule = make_optimizer(cfg.optimizer, self.total_steps)
        optional = {"ref_logps": cfg.reference.precompute, "prefix_target": cfg.data.prefix_sharing}
        fields = {k: n for k, n in BATCH_FIELDS.items() if optional.get(k, True)}
        self.batch_shardings = {k: batch_sharding(self.mesh, self.rules, n) for k, n in fields.items()}
        self.uses_reference = settings.uses_reference
        self.ref_shardings = self.param_shardings if self.uses_reference and not cfg.reference.precompute else None
        self._train_step = make_train_step(self.graphdef, settings, self.optimizer, self.schedule, self.num_micro,
                                           self.split)
        self.eval_step = jax.jit(make_eval_step(self.graphdef, settings),
                                 in_shardings=(self.param_shardings, self.ref_shardings, self.batch_shardings))

    # -- state -----------------------------------------------------------------------------------------------
    def initial_params(self) -> dict:
        if self.cfg.model.path:
            return components.load_sharded_params(self.cfg.model.path, self.spec, self.param_shardings)
        return components.init_params(self.spec, self.param_shardings, self.cfg.run.seed)

    def reference_params(self, initial: dict, copy: bool = True) -> dict:
        """`reference.path`'s weights, or the initial policy (copied when training will update `initial`)."""
        if self.cfg.reference.path:
            ref_spec = spec_from_pretrained(resolve_path(self.cfg.reference.path),
                                            **components.runtime_options(self.cfg))[1]
            if spec_to_meta(ref_spec) != spec_to_meta(self.spec):
                raise ConfigError(f"reference.path {self.cfg.reference.path} has a different architecture than the policy")
            return components.load_sharded_params(self.cfg.reference.path, self.spec, self.param_shardings)
        return components.copy_params(initial) if copy else initial

    def precompute_reference(self, initial: dict) -> None:
        """Attaches cached (or freshly computed) reference logps to the train and eval batches; the reference
        weights live only during the pass."""
        ref_params = self.reference_params(initial, copy=False)
        compute = jax.jit(make_reference_logps(self.graphdef), out_shardings=replicated(self.mesh),
                          in_shardings=(self.param_shardings, {k: v for k, v in self.batch_shardings.items()
                                                               if k != "ref_logps"}))
        micro = self.cfg.trainer.micro_batch_size or self.cfg.trainer.batch_size
        for split, builder in (("train", self.train_batches), ("eval", self.eval_batches)):
            if builder is None:
                continue
            walk = builder
            if split == "train":  # every training pair once, in micro batches
                plan = components.batch_plan(self.cfg, self.tokenizer, shuffle=False, batch_size=micro)
                walk = dataclasses.replace(builder, schedule=eval_schedule(builder.store, plan))
            path = precompute.cache_path(self.run_dir, split, self.data_fingerprints[split], self.cfg)
            table = precompute.load_or_compute(
                path, lambda: precompute.compute_table(compute, ref_params, walk, self._to_global), f"data.{split}")
            setattr(self, f"{split}_batches", dataclasses.replace(builder, reference_logps=table))

    def _to_global(self, batch: dict) -> dict:
        return _global_batch(batch, self.batch_shardings)

    def _normalise_shardings(self, tree):
        """Every array on the mesh: scalars and other unannotated leaves are replicated."""
        def sharding_of(x):
            return x.sharding if isinstance(x.sharding, NamedSharding) else replicated(self.mesh)
        shardings = jax.tree.map(sharding_of, tree)
        return jax.device_put(tree, shardings), shardings

    def meta(self, data_state: dict) -> dict:
        return {"model": spec_to_meta(self.spec), "config": to_dict(self.cfg), "data_iterator": data_state,
                "mesh": dict(self.mesh.shape), "data_parallel": self.data_parallel}

    # -- loop ------------------------------------------------------------------------------------------------
    def evaluate(self, params: dict, ref_params: dict) -> dict:
        totals = None
        for step in range(len(self.eval_batches.schedule)):
            batch = self.eval_batches(step)
            sums = self.eval_step(params, ref_params, _global_batch(batch, self.batch_shardings))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        metrics = finalize_metrics(jax.device_get(totals), sft=not self.uses_reference)
        return {f"eval_{k}": float(v) for k, v in metrics.items()}

    def _check_finite(self, step: int, metrics: dict) -> None:
        """Raises when step `step` produced a non-finite loss or gradient (its update is then never saved)."""
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            epoch = int(self.batch_schedule.epoch_at(step - 1))
            pairs = self.train_batches.pair_indices(step - 1)
            rows = self.train_batches.store.rows[pairs[pairs >= 0]].tolist()
            raise NonFiniteLossError(
                f"loss is {loss} (grad_norm {grad_norm}) at step {step}, global batch {step - 1} (epoch {epoch}; "
                f"rows {rows} of data.train in this process's share); stopping, the checkpoints in "
                f"{self.run_dir / 'checkpoints'} are untouched")

    def train(self) -> dict:
        """Runs (or resumes) the job; steps are traced under the mesh so the kernels shard per device."""
        with jax.set_mesh(self.mesh):
            return self._train()

    def _train(self) -> dict:
        cfg, trainer = self.cfg, self.cfg.trainer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        store, latest = CheckpointStore(self.run_dir / "checkpoints", trainer.keep_checkpoints), self.latest
        if self.is_main:
            _write_config_atomically(cfg, self.run_dir)

        params = self.initial_params()
        ref_params = None
        if cfg.reference.precompute:
            self.precompute_reference(params)
        elif self.uses_reference:
            ref_params = self.reference_params(params)
        if self.split.freezes_anything:
            log.info("freeze: %s", self.split.summary(params))
        opt_shardings = optimizer_state_shardings(self.optimizer, self.split.trainable(params),
                                                  self.split.trainable(self.param_shardings), replicated(self.mesh))
        opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(self.split.trainable(params))
        state = {"step": jnp.asarray(0, jnp.int32), "params": params, "opt_state": opt_state}
        state, state_shardings = self._normalise_shardings(state)
        start, batches = 0, batch_iterator(self.train_batches, self.data_fingerprint)
        if latest is not None:
            batches.restore(self.resume_meta["data_iterator"], where=f"checkpoint {store.directory / str(latest)}")
            restored = store.restore(latest, abstract_like(state["params"]), abstract_like(state["opt_state"]))
            state = {"step": jax.device_put(jnp.asarray(latest, jnp.int32), replicated(self.mesh)),
                     "params": restored["params"], "opt_state": restored["opt_state"]}
            start = latest
            log.info("resuming from %s at step %d", store.directory / str(latest), latest)
        train_step = jax.jit(self._train_step,
                             in_shardings=(state_shardings, self.ref_shardings, self.batch_shardings),
                             out_shardings=(state_shardings, replicated(self.mesh)), donate_argnums=0)

        metrics_log = MetricsLog(self.run_dir, self.total_steps, start, enabled=self.is_main)
        window, tokens, last_row, eval_row = [], 0, {}, {}
        window_start = time.perf_counter()
        pending = None  # (step, metrics) checked one step late so the host never stalls the device
        try:
            for step in range(start + 1, self.total_steps + 1):
                batch = next(batches)
                state, metrics = train_step(state, ref_params, _global_batch(batch, self.batch_shardings))
                tokens += batch_tokens(batch) * jax.process_count()
                if pending is not None:
                    self._check_finite(*pending)
                pending = (step, metrics)
                window.append(metrics)
                metrics_log.advance()
                if step % trainer.log_every == 0 or step == self.total_steps:
                    self._check_finite(*pending)
                    row = _mean_rows(jax.device_get(window))
                    row.update(step=step, epoch=self.batch_schedule.epoch_at(step),
                               tokens_per_sec=tokens / (time.perf_counter() - window_start))
                    metrics_log.write(row)
                    last_row, window, tokens = row, [], 0
                if self.eval_batches is not None and trainer.eval_every and step % trainer.eval_every == 0:
                    eval_row = {"step": step, "epoch": self.batch_schedule.epoch_at(step),
                                **self.evaluate(state["params"], ref_params)}
                    metrics_log.write(eval_row)
                if trainer.save_every and step % trainer.save_every == 0:
                    self._check_finite(*pending)
                    store.save(step, state["params"], state["opt_state"], self.meta(batches.state()))
                window_start = time.perf_counter() if not window else window_start
            final_step = self.total_steps
            if pending is not None:
                self._check_finite(*pending)
            if self.eval_batches is not None and eval_row.get("step") != final_step:
                eval_row = {"step": final_step, "epoch": self.batch_schedule.epoch_at(final_step),
                            **self.evaluate(state["params"], ref_params)}
                metrics_log.write(eval_row)
            if store.latest_step() != final_step:
                store.save(final_step, state["params"], state["opt_state"], self.meta(batches.state()))
            store.wait()
        finally:
            metrics_log.close()
            store.close()
        if cfg.export.hf:
            self.export(state["params"], self.run_dir / "hf", self.total_steps)
        return {"train": last_row, "eval": eval_row, "steps": self.total_steps, "run_dir": str(self.run_dir)}

    def export(self, params: dict, out_dir: Path, step: int) -> None:
        """Weights, tokenizer and model card; every process takes part in gathering, the first one writes."""
        host = components.host_params(params)
        if not self.is_main:
            return
        save_params(self.spec, host, out_dir, self.cfg.export.dtype)
        self.tokenizer.save_pretrained(out_dir)
        write_model_card(out_dir, self.cfg, self.run_dir / "metrics.jsonl", step, dict(self.mesh.shape),
                         self.data_parallel)
        log.info("exported Hugging Face model to %s", out_dir)
