"""TR-DPO (`reference.sync_steps`): the moving reference is part of the checkpointed state, so a run resumes
exactly; what it cannot combine with is refused. Its values against TRL's `sync_ref_model` are in
test_trl_run_parity.py."""
import json

import pytest

from maxdpo.config import ConfigError
from maxdpo.configure import load_config
from test_train_e2e import whole_and_resumed


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tr_dpo_run_resumes_with_its_moved_reference(tmp_path):
    """Losing everything after the step-3 checkpoint (whose reference was mixed at step 2) and rerunning logs
    the uninterrupted run's metrics; a restart from the initial reference would not."""
    args = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.log_every=1", "trainer.save_every=3",
            "data.eval=null", "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0",
            "reference.sync_steps=2", "reference.mixup_alpha=0.5"]
    whole, resumed = whole_and_resumed(tmp_path, args, 6)
    assert _rows(resumed) == _rows(whole)


@pytest.mark.parametrize("options,message", [
    (["reference.precompute=true"], "cannot be computed once ahead"),
    (["lora.rank=4", "lora.targets=[q_proj]"], "adapter-free base"),
    (["dpo.loss=simpo"], "trains without a reference model; unset reference.sync_steps"),
    (["reference.mixup_alpha=0"], "must be in \\(0, 1\\]"),
    (["reference.sync_steps=-1"], "must be >= 0"),
])
def test_what_a_moving_reference_cannot_combine_with_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["reference.sync_steps=2", *options])
