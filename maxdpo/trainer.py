"""The training loop: feeds batches to the program's jitted step, logs, evaluates, checkpoints, exports."""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from maxdpo.atomic import atomic_path
from maxdpo.checkpoint.peft import save_model
from maxdpo.checkpoint.state import CheckpointStore
from maxdpo.checkpoint.safetensors_io import CheckpointError
from maxdpo.config import Config, ConfigError, save_config, to_dict
from maxdpo.data.loader import BatchBuilder, BatchIterator, batch_iterator, batch_tokens
from maxdpo.data.run_data import RunData, check_vocab, export_tokenizer, load_tokenizer, prepare_run_data
from maxdpo.dpo.precompute import attach_reference_logps
from maxdpo.dpo.step import WINDOW_SUM, LossSettings, finalize_metrics
from maxdpo.export_folder import check_target, export_folder
from maxdpo.metrics_log import MetricsLog, read_rows
from maxdpo.model_card import write_model_card
from maxdpo.program import TrainProgram, architecture_from_config, build_train_program, check_layout
from maxdpo.resume import check_architecture, check_resumable, resume_point
from maxdpo.run_lock import run_folder_lock
from maxdpo.sampling import SamplingSettings, completions, left_padded, make_sampler, stop_token_ids
from maxdpo.sharding import make_mesh, replicated
from maxdpo.weights import host_params, initial_params, reference_params

log = logging.getLogger("maxdpo")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN or inf; the message names the step and batch."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint at the step it had reached and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """While the block runs, SIGTERM and SIGINT (what schedulers, preemptible VMs and Ctrl-C send) are noted in
    the yielded list instead of ending the process; a second one of the same kind ends it as usual."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])

    previous = {signum: signal.signal(signum, note) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested(received: list[int]) -> int | None:
    """The signal any process of the run received (all of them stop at the same step), or None."""
    mine = received[0] if received else 0
    if jax.process_count() > 1:
        mine = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    return mine or None


def evaluate(program: TrainProgram, params: dict, ref_params: dict | None, batches: BatchBuilder,
             reward_moments: dict | None = None) -> dict:
    """`eval_`-prefixed metrics over every batch of `batches` (sums over pairs and tokens, divided once); one that
    no batch defines (NaN: an unpaired run's eval data without undesirable examples) is left out, as TRL does."""
    totals = None
    for step in range(len(batches.schedule)):
        sums = program.eval_step(params, ref_params, program.global_batch(batches(step)), reward_moments)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    metrics = finalize_metrics(jax.device_get(totals), program.settings)
    return {f"eval_{k}": float(v) for k, v in metrics.items() if not np.isnan(v)}


def _mean_rows(window: list[dict], settings: LossSettings) -> dict:
    """Averages the metrics of the steps since the last log (TRL's logging); the learning rate and gradient norm
    are the last step's (transformers logs those of the step it logs at).
    Unpaired losses carry their steps' metric sums (`WINDOW_SUM`): their metrics are finalised from the window's
    sums, as KTOTrainer and BCOTrainer aggregate every micro-batch of a logging window; one that no step defines
    (no undesirable example) is left out, as TRL does."""
    row = {name: float(np.mean([m[name] for m in window])) for name in window[0] if not name.startswith(WINDOW_SUM)}
    sums = {name[len(WINDOW_SUM):]: np.sum([m[name] for m in window], axis=0)
            for name in window[0] if name.startswith(WINDOW_SUM)}
    if sums:
        row.update({name: float(value) for name, value in finalize_metrics(sums, settings).items()})
        row = {name: value for name, value in row.items() if not np.isnan(value)}
    row.update({name: float(window[-1][name]) for name in ("learning_rate", "grad_norm")})
    return row


def run(cfg: Config) -> dict:
    """One run under its folder's lock (`run_lock`): a second writer of the same folder is refused."""
    with run_folder_lock(Path(cfg.run.output_dir).absolute(), take=jax.process_index() == 0):
        return Trainer(cfg).train()


class Trainer:
    """One run: its data, its program, and the loop; `devices` (default: all) lets tests place the same run on
    a smaller mesh."""

    def __init__(self, cfg: Config, devices: list[jax.Device] | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir).absolute()
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(cfg.mesh, devices)
        self.resume = resume_point(cfg, self.run_dir)
        spec = architecture_from_config(cfg)  # everything checkable without the data, before tokenising it
        if self.resume is not None:
            check_architecture(self.resume[1], spec, f"checkpoint {self.run_dir / 'checkpoints' / str(self.resume[0])}")
        check_layout(cfg, self.mesh, spec)
        if cfg.export.hf:
            check_target(self.run_dir / "hf")  # the final export must have somewhere to go
        self.tokenizer = load_tokenizer(cfg)
        check_vocab(spec.vocab_size, self.tokenizer)
        self.data = prepare_run_data(cfg, self.tokenizer, spec.vocab_size)
        self.total_steps = self.data.total_steps(cfg.trainer.max_steps)
        self.program = build_train_program(cfg, self.mesh, self.total_steps, spec)
        self._sampler = None  # eval.samples' jitted sampler, built at the first evaluation
        self._stops = stop_token_ids(self.tokenizer)
        log.info("model: %s, %.2fM parameters, %d layers; mesh %s; process %d of %d", spec.family,
                 spec.num_params() / 1e6, spec.num_layers, dict(self.mesh.shape), jax.process_index(),
                 jax.process_count())

    # -- state -----------------------------------------------------------------------------------------------
    def prepare_reference(self, params: dict) -> tuple[dict | None, RunData]:
        """(reference params for the steps, the data they read): the reference model's weights, or none with
        the reference's logps attached to the batches (`reference.precompute`) or a reference-free loss."""
        program = self.program
        if self.cfg.reference.precompute:
            ref_params = reference_params(program, params, copy=False)
            return None, attach_reference_logps(program, self.data, ref_params, self.run_dir)
        return (reference_params(program, params) if program.reference_model else None), self.data

    def meta(self, iterator: BatchIterator, window: list[dict], state: dict) -> dict:
        """A checkpoint's metadata; `window` (the metrics of the steps since the last log) lets a resumed run log
        the same averages as an uninterrupted one; BCO's running reward mean (two scalars) rides along."""
        meta = {"model": self.program.spec.to_dict(), "config": to_dict(self.cfg), "data_iterator": iterator.state(),
                "mesh": dict(self.mesh.shape), "data_parallel": self.program.data_parallel,
                "log_window": [{name: float(value) for name, value in metrics.items()}
                               for metrics in jax.device_get(window)]}
        if "reward_moments" in state:
            meta["reward_moments"] = {name: float(value) for name, value in
                                      jax.device_get(state["reward_moments"]).items()}
        return meta

    # -- loop ------------------------------------------------------------------------------------------------
    def _check_finite(self, step: int, metrics: dict) -> None:
        """Raises when step `step` produced a non-finite loss or gradient (its update is then never saved)."""
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            train = self.data.train
            epoch = int(train.schedule.epoch_at(step - 1))
            pairs = train.pair_indices(step - 1)
            rows = train.store.rows[pairs[pairs >= 0]].tolist()
            raise NonFiniteLossError(
                f"loss is {loss} (grad_norm {grad_norm}) at step {step}, global batch {step - 1} (epoch {epoch}; "
                f"rows {rows} of data.train in this process's share); stopping, the checkpoints in "
                f"{self.run_dir / 'checkpoints'} are untouched")

    def train(self) -> dict:
        """Runs (or resumes) the job; steps are traced under the mesh so the kernels shard per device. On
        SIGTERM or SIGINT it checkpoints the step it reached and raises Preempted."""
        with self.program.mesh_context(), stop_signals() as received:
            self._received = received
            return self._train()

    def _train(self) -> dict:
        cfg, program = self.cfg, self.program
        self.run_dir.mkdir(parents=True, exist_ok=True)
        store = CheckpointStore(self.run_dir / "checkpoints", cfg.trainer.keep_checkpoints)
        if self.is_main:
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                save_config(cfg, tmp)
        log.info("weights: %s", f"loading {cfg.model.path}" if cfg.model.path else "random init")
        params = initial_params(program)
        ref_params, data = self.prepare_reference(params)
        if program.split.freezes_anything:
            log.info("freeze: %s", program.split.summary(params))
        state, start = program.init_state(params, ref_params), 0
        if program.reference_sync:  # a moving reference (TR-DPO) is part of the state
            ref_params = None
        batches = batch_iterator(data.train, data.schedule_fingerprint)
        saved_window: list[dict] = []
        if self.resume is not None:
            start, meta, restored = self._restore_intact(store)
            batches.restore(meta["data_iterator"], where=f"checkpoint {store.directory / str(start)}")
            state = {"step": jax.device_put(jnp.asarray(start, jnp.int32), program.abstract_state["step"].sharding),
                     "params": restored["params"], "opt_state": restored["opt_state"],
                     **({"reference": restored["reference"]} if "reference" in state else {})}
            if "reward_moments" in program.abstract_state:  # exact values through the checkpoint's JSON
                moments = program.abstract_state["reward_moments"]
                state["reward_moments"] = jax.device_put(
                    {name: np.asarray(value, moments[name].dtype) for name, value in meta["reward_moments"].items()},
                    program.state_shardings["reward_moments"])
            saved_window = meta.get("log_window", [])
            log.info("resuming from %s at step %d", store.directory / str(start), start)
        log_cfg = cfg.log
        wandb = (dict(project=log_cfg.project, name=log_cfg.name or cfg.run.name, tags=log_cfg.tags,
                      config=to_dict(cfg)) if log_cfg.wandb else None)
        metrics_log = MetricsLog(self.run_dir, self.total_steps, start, enabled=self.is_main, wandb=wandb)
        if start < self.total_steps:
            log.info("compiling the train step (XLA, on the first batch; minutes for large models)")
        try:
            window = [{name: np.float32(value) for name, value in metrics.items()} for metrics in saved_window]
            state, last_row, eval_row = self._steps(state, ref_params, data, batches, start, window, store,
                                                    metrics_log)
        finally:
            metrics_log.close()
            store.close()
        if cfg.export.hf:
            self.export(state["params"], self.run_dir / "hf", self.total_steps)
        return {"train": last_row, "eval": eval_row, "steps": self.total_steps, "run_dir": str(self.run_dir)}

    def _restore_intact(self, store: CheckpointStore) -> tuple[int, dict, dict]:
        """(step, meta, restored state) of the newest checkpoint that restores. One that does not (a truncated or
        missing array file) is moved aside to `<step>.damaged` (kept, never deleted) with a warning naming
        it, and the one before it is tried; when none is left the run stops rather than start afresh."""
        abstract = self.program.abstract_state
        for step in store.steps():
            where = store.directory / str(step)
            try:
                meta = store.read_meta(step)
                check_resumable(self.cfg, meta["config"], f"checkpoint {where}")
                restored = store.restore(step, abstract["params"], abstract["opt_state"], abstract.get("reference"))
                error = None
            except ConfigError:
                raise
            except Exception as err:  # whatever the storage layer raises for a damaged file
                restored, error = None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if jax.process_count() > 1:  # every process must resume from the same step
                intact = multihost_utils.process_allgather(np.int32(error is None))
                error = error or (None if np.all(intact) else "damaged on another process")
            if error is None:
                return step, meta, restored
            store.set_aside(step, self.is_main)
            log.warning("checkpoint %s is damaged (%s); moved to %s.damaged, trying the one before it", where,
                        error[:300], where)
        raise CheckpointError(f"no intact checkpoint left in {store.directory} (the damaged ones are in "
                              "<step>.damaged folders); move them away to start the run afresh")

    def _steps(self, state: dict, ref_params: dict | None, data: RunData, batches: BatchIterator, start: int,
               window: list[dict], store: CheckpointStore, metrics_log: MetricsLog) -> tuple[dict, dict, dict]:
        """Steps start+1 .. total_steps, then the final evaluation and checkpoint; (state, last train row, last
        eval row). `window`: the metrics of the steps since the last log row (a resumed run's, from its
        checkpoint)."""
        trainer, program = self.cfg.trainer, self.program
        tokens, last_row, eval_row = 0, {}, {}
        window_start = time.perf_counter()
        pending = None  # (step, metrics) checked one step late so the host never stalls the device

        def evaluate_at(step: int) -> dict:
            row = {"step": step, "epoch": data.train.schedule.epoch_at(step),
                   **evaluate(program, state["params"], state.get("reference", ref_params), data.eval,
                              state.get("reward_moments"))}
            metrics_log.write(row)
            if self.cfg.eval.samples:
                metrics_log.write_samples(step, self._samples(state["params"], data.eval))
            return row

        for step in range(start + 1, self.total_steps + 1):
            batch = next(batches)
            state, metrics = program.train_step(state, ref_params, program.global_batch(batch))
            tokens += batch_tokens(batch) * jax.process_count()
            if pending is not None:
                self._check_finite(*pending)
            pending = (step, metrics)
            window.append(metrics)
            metrics_log.advance()
            if step % trainer.log_every == 0 or step == self.total_steps:
                self._check_finite(*pending)
                row = _mean_rows(jax.device_get(window), program.settings)
                row.update(step=step, epoch=data.train.schedule.epoch_at(step),
                           tokens_per_sec=tokens / (time.perf_counter() - window_start))
                metrics_log.write(row)
                last_row, window, tokens = row, [], 0
            if data.eval is not None and trainer.eval_every and step % trainer.eval_every == 0:
                eval_row = evaluate_at(step)
            if trainer.save_every and step % trainer.save_every == 0:
                self._check_finite(*pending)
                self._save(store, step, state, batches, window)
            signum = stop_requested(self._received)
            if signum is not None:
                self._stop(signum, step, state, window, pending, store, batches)
            window_start = time.perf_counter() if not window else window_start
        if pending is not None:
            self._check_finite(*pending)
        if start == self.total_steps:  # a finished run again: its final rows are logged (before its last save)
            rows = read_rows(self.run_dir / "metrics.jsonl")
            last_row = next((r for r in reversed(rows) if "loss" in r), {})
            eval_row = next((r for r in reversed(rows) if any(k.startswith("eval_") for k in r)), {})
        elif data.eval is not None and eval_row.get("step") != self.total_steps:
            eval_row = evaluate_at(self.total_steps)
        if store.latest_step() != self.total_steps:
            self._save(store, self.total_steps, state, batches, window)
        store.wait()
        return state, last_row, eval_row

    def _save(self, store: CheckpointStore, step: int, state: dict, batches: BatchIterator,
              window: list[dict]) -> None:
        store.save(step, state["params"], state["opt_state"], self.meta(batches, window, state),
                   state.get("reference"))

    def _stop(self, signum: int, step: int, state: dict, window: list[dict], pending: tuple, store: CheckpointStore,
              batches: BatchIterator) -> None:
        """Checkpoints step `step` (unless it is saved already) and raises Preempted."""
        self._check_finite(*pending)
        if store.latest_step() != step:
            self._save(store, step, state, batches, window)
        store.wait()
        raise Preempted(f"stopped by {signal.Signals(signum).name} at step {step} of {self.total_steps}; checkpoint "
                        f"{store.directory / str(step)} is saved; run the same command again to resume", signum)

    def _samples(self, params: dict, batches: BatchBuilder) -> list[dict]:
        """The policy's completions of the first `eval.samples` eval prompts (as tokenised for training), with
        each one's chosen completion."""
        cfg, tokenizer = self.cfg.eval, self.tokenizer
        if self._sampler is None:
            settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature)
            self._sampler = make_sampler(self.program.graphdef, settings, self._stops, tokenizer.pad_token_id,
                                         replicated(self.mesh))
        pairs = [batches.store.pair(i) for i in range(min(cfg.samples, len(batches.store)))]
        prompts = [pair.chosen[:pair.chosen_prompt_len].tolist() for pair in pairs]
        ids, mask = left_padded(prompts, tokenizer.pad_token_id)
        tokens = np.asarray(self._sampler(params, ids, mask, jax.random.key(self.cfg.run.seed)))

        def text(ids) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)
        samples = [{"prompt": text(prompt), "chosen": text(pair.chosen[pair.chosen_prompt_len:]),
                    "sample": text(sample)} for prompt, pair, sample in zip(prompts, pairs,
                                                                             completions(tokens, self._stops))]
        if batches.store.labels is not None:  # unpaired data: the example's completion, desirable or not
            for index, sample in enumerate(samples):
                sample["label"] = int(batches.store.labels[index])
        return samples

    def export(self, params: dict, out_dir: Path, step: int) -> None:
        """Weights, tokenizer and model card; every process takes part in gathering, the first one writes."""
        host = host_params(params)
        if not self.is_main:
            return
        with export_folder(out_dir) as staging:
            save_model(self.program.spec, self.cfg, host, staging)
            export_tokenizer(self.cfg, staging)
            write_model_card(staging, self.cfg, self.run_dir / "metrics.jsonl", step, dict(self.mesh.shape),
                             self.program.data_parallel)
        log.info("exported Hugging Face model to %s", out_dir)
