"""A run killed with SIGKILL mid-training, or stopped by SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C),
resumes to exactly the uninterrupted run: final parameters and the metric stream (every logged value but
throughput) are identical. On SIGTERM / SIGINT the run checkpoints the step it reached and exits with one
line."""
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


def _interrupt(run_dir, cwd, after_step: int, signum: int) -> subprocess.Popen:
    """Launches (or resumes) the run and sends `signum` once it has logged `after_step`."""
    process = _launch(run_dir, cwd)
    deadline = time.time() + 600
    while max(_logged_steps(run_dir), default=0) < after_step and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted; make it longer"
    os.kill(process.pid, signum)
    return process


def _saved_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_sigkill_and_sigint_then_resume_is_identical(tmp_path):
    """SIGTERM right after the step-40 checkpoint began saving, SIGKILL mid-training in the resumed run, SIGINT in
    the next: SIGTERM / SIGINT save the step they land on (not only the last save_every step) and exit 128 +
    the signal with one line and no traceback; SIGKILL leaves the earlier checkpoints; the fourth launch
    finishes the same run as the uninterrupted one."""
    whole = _launch(tmp_path / "whole", tmp_path)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    run_dir = tmp_path / "interrupted"
    for after_step, signum in ((40, signal.SIGTERM), (110, signal.SIGKILL), (150, signal.SIGINT)):
        process = _interrupt(run_dir, tmp_path, after_step, signum)
        if signum == signal.SIGKILL:
            process.wait()
            assert max(_saved_steps(run_dir)) < 200
            continue
        assert process.wait(timeout=600) == 128 + signum
        err = process.stderr.read()
        (line,) = [text for text in err.splitlines() if text.startswith("maxdpo:")]
        stopped = int(line.split(" at step ")[1].split()[0])
        assert line.startswith(f"maxdpo: stopped by {signal.Signals(signum).name} at step {stopped} of 200")
        assert "Traceback" not in err and stopped >= after_step and max(_saved_steps(run_dir)) == stopped
        assert not (run_dir / "hf").exists()

    resumed = _launch(run_dir, tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert _stream(run_dir) == _stream(tmp_path / "whole")
    final = load_file(run_dir / "hf" / "model.safetensors")
    reference = load_file(tmp_path / "whole" / "hf" / "model.safetensors")
    assert final.keys() == reference.keys()
    for name in final:
        np.testing.assert_array_equal(final[name], reference[name], err_msg=name)
