"""A run's program built from its config and stepped on the run's own data, without the CLI, run folder or
checkpoints: for tests that compare training steps across meshes, layouts and kernels."""
import jax

from maxdpo.config import Config
from maxdpo.data.run_data import load_tokenizer, prepare_run_data
from maxdpo.program import architecture_from_config, build_train_program
from maxdpo.sharding import make_mesh
from maxdpo.trainer import evaluate
from maxdpo.weights import initial_params, reference_params


def train_steps(cfg: Config, devices=None, evaluate_at_end: bool = False) -> tuple[list[dict], dict]:
    """(metrics of each of the run's steps, eval metrics after the last step or {}), as floats. The same
    program, data order and reference as `python -m maxdpo.train` with `cfg`; the reference runs live
    (`reference.precompute` runs go through the trainer)."""
    assert not cfg.reference.precompute, "train_steps runs the reference model; use the trainer for precompute"
    spec = architecture_from_config(cfg)
    data = prepare_run_data(cfg, load_tokenizer(cfg), spec.vocab_size)
    total = data.total_steps(cfg.trainer.max_steps)
    program = build_train_program(cfg, make_mesh(cfg.mesh, devices), total, spec)
    with program.mesh_context():
        params = initial_params(program)
        ref_params = reference_params(program, params) if program.reference_model else None
        state, rows = program.init_state(params), []
        for step in range(total):
            state, metrics = program.train_step(state, ref_params, program.global_batch(data.train(step)))
            rows.append({name: float(value) for name, value in jax.device_get(metrics).items()})
        final = evaluate(program, state["params"], ref_params, data.eval) if evaluate_at_end else {}
    return rows, final
