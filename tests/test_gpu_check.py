"""tools/gpu_check.py, the one command a lent GPU runs, works end to end (at smoke size on this CPU) with only
what the GPU machine's image has: no grain, datasets or tensorboardX."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tools.gpu_check import attention_ids

ABSENT_ON_GPU_IMAGE = ("grain", "datasets", "tensorboardX")


def test_gpu_check_runs_every_section_without_the_packages_the_gpu_image_lacks(tmp_path):
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT_ON_GPU_IMAGE)
    script = (f"import sys; {block}; import maxdpo.compile; from tools.gpu_check import main; "
              f"sys.exit(main([{str(tmp_path)!r}, '--smoke']))")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["environment", "ceilings", "accuracy", "kernels", "dpo_step", "deviceless"]
    assert not [name for name, section in sections.items() if "error" in section]
    checks = sections["accuracy"]["checks"]
    assert {c["check"] for c in checks} == {"attention prefix_shared_h64", "experts"}
    assert all(c["passed"] and set(c["errors"]) >= {"out"} for c in checks)
    assert {(row["kernel"], row["impl"]) for row in sections["kernels"]["rows"]} >= {
        ("attention", "pallas"), ("attention", "jax_xla"), ("experts", "pallas"), ("experts", "ragged")}
    assert sections["dpo_step"]["tokens_per_s"] > 0
    assert sections["deviceless"]["predicted_gb"]["total"] > 0
    assert "device cpu" in done.stdout and "SMOKE" in done.stdout


def test_random_attention_rows_are_valid_packed_and_prefix_shared_layouts():
    rng = np.random.default_rng(0)
    positions, segments = attention_ids("packed", 4, 256, rng)
    for row_positions, row_segments in zip(positions, segments):
        for segment in set(row_segments.tolist()) - {0}:
            np.testing.assert_array_equal(row_positions[row_segments == segment], np.arange((row_segments == segment).sum()))
    positions, segments = attention_ids("shared", 4, 256, rng)
    for row_positions, row_segments in zip(positions, segments):
        for pair in set((row_segments // 4).tolist()) - {0}:
            prompt, chosen, rejected = (row_positions[row_segments == 4 * pair + branch] for branch in range(3))
            assert len(prompt) and len(chosen) and len(rejected)
            np.testing.assert_array_equal(chosen, len(prompt) + np.arange(len(chosen)))
            np.testing.assert_array_equal(rejected, len(prompt) + np.arange(len(rejected)))
