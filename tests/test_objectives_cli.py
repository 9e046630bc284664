"""Every objective beyond DPO through `maxdpo.train` on the bundled data, packed and unpacked: a few steps that
log TRL's metric names with finite values (their values against TRL are in test_trl_parity.py,
test_trl_run_parity.py, test_kto_parity.py and test_bco_parity.py; SimPO and ORPO learning the default job,
test_reference_free.py). The unpaired losses take the bundled preference rows as TRL's KTOTrainer does: each
pair becomes a desirable and an undesirable example."""
import json
import math

import pytest

from maxdpo import train

OBJECTIVES = {
    "cpo": ["dpo.loss=cpo", "dpo.sft_weight=1.0"],
    "simpo": ["dpo.loss=simpo", "dpo.beta=2.0"],
    "orpo": ["dpo.loss=orpo"],
    "discopop": ["dpo.loss=discopop"],
    "aot": ["dpo.loss=aot"],
    "aot_unpaired": ["dpo.loss=aot_unpaired", "dpo.label_smoothing=0.1"],
    "f-dpo": ["dpo.loss=sigmoid", "dpo.f_divergence_type=alpha_divergence", "dpo.f_alpha_divergence_coef=0.3"],
    "mpo": ["dpo.loss=[sigmoid, bco_pair, sft]", "dpo.loss_weights=[0.8, 0.2, 1.0]"],
    "tr-dpo": ["reference.sync_steps=2", "reference.mixup_alpha=0.6"],
    "ld-dpo": ["dpo.ld_alpha=0.5"],
    "wpo": ["dpo.use_weighting=true"],
    "kto": ["dpo.loss=kto", "dpo.undesirable_weight=1.2"],
    "kto-shared-prompt": ["dpo.loss=kto", "data.prefix_sharing=true"],
    "apo_zero_unpaired": ["dpo.loss=apo_zero_unpaired"],
    "bco": ["dpo.loss=bco", "reference.precompute=true"],
}
UNPAIRED = ("kto", "kto-shared-prompt", "apo_zero_unpaired", "bco")


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_trains_through_the_cli(tmp_path, objective, packing):
    run = tmp_path / "run"
    assert train.main([*OBJECTIVES[objective], f"data.packing={str(packing).lower()}", "trainer.max_steps=4",
                       "trainer.log_every=2", "trainer.eval_every=4", "optimizer.learning_rate=1e-2",
                       f"run.output_dir={run}"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4] and eval_rows
    names = ["loss", "grad_norm", "rewards/margins", "logps/chosen", "logits/rejected"]
    names += ["nll_loss"] if objective in ("cpo", "simpo", "orpo") else []
    names += ["log_odds_ratio"] if objective == "orpo" else []
    names += ["delta" if objective == "bco" else "kl"] if objective in UNPAIRED else []
    for row in train_rows:
        assert all(math.isfinite(row[name]) for name in names), row
    # unpaired: the eval pairs unpair as TRL does (every chosen example, then every rejected one), so each eval
    # batch holds one kind and defines no margin
    eval_name = ("eval_delta" if objective == "bco" else "eval_kl") if objective in UNPAIRED else \
        "eval_rewards/accuracies"
    assert math.isfinite(eval_rows[-1][eval_name]) and math.isfinite(eval_rows[-1]["eval_loss"])
