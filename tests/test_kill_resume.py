"""A run killed with SIGKILL mid-training resumes to exactly the uninterrupted run: final parameters and the
metric stream (every logged value but throughput) are identical."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from maxdpo.metrics_log import read_rows

ARGS = ["trainer.max_steps=200", "trainer.save_every=40", "trainer.log_every=10", "trainer.eval_every=50"]


def _launch(run_dir, cwd):
    return subprocess.Popen([sys.executable, "-m", "maxdpo.train", *ARGS, f"run.output_dir={run_dir}"], cwd=cwd,
                            env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_steps(run_dir):
    """Steps logged so far by a running process (read_rows skips a row being written)."""
    return [row["step"] for row in read_rows(run_dir / "metrics.jsonl")]


def _stream(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_training_then_resume_is_identical(tmp_path):
    whole = _launch(tmp_path / "whole", tmp_path)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    killed_dir = tmp_path / "killed"
    killed = _launch(killed_dir, tmp_path)
    deadline = time.time() + 600
    while max(_logged_steps(killed_dir), default=0) < 110 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "hf").exists()
    saved = sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < 200

    resumed = _launch(killed_dir, tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert _stream(killed_dir) == _stream(tmp_path / "whole")
    final, reference = load_file(killed_dir / "hf" / "model.safetensors"), load_file(
        tmp_path / "whole" / "hf" / "model.safetensors")
    assert final.keys() == reference.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], reference[name], err_msg=name)
