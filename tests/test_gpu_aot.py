"""The run's program compiles for NVIDIA H100/H200 with XLA:GPU on this CPU machine (deviceless, through
ptxas to SASS), with the flash kernels on their Triton path. Needs the CUDA plugin (part of the test extra)."""
import importlib.util

import pytest

from maxdpo.compile import compile_program
from maxdpo.configure import load_config
from maxdpo.topology import TopologyError, compile_devices, parse_topology

pytestmark = [pytest.mark.gpu_aot,
              pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda13") is None,
                                 reason="jax-cuda13-plugin is not installed")]


def test_gpu_topologies_name_hosts_and_chips():
    one, explicit = parse_topology("h100:8"), parse_topology("H100:1x8")
    assert (one.chip, one.chips, one.hosts) == (explicit.chip, explicit.chips, explicit.hosts) == ("h100", 8, 1)
    two_hosts = parse_topology("h100:2x8")
    assert (two_hosts.chip, two_hosts.chips, two_hosts.hosts, two_hosts.is_gpu) == ("h100", 16, 2, True)
    assert not parse_topology("v5p-8").is_gpu
    with pytest.raises(TopologyError, match="unknown topology 'a100:8'"):
        parse_topology("a100:8")


@pytest.mark.parametrize("name,kind", [("h100:8", "NVIDIA H100 80GB HBM3"), ("h200:2x4", "NVIDIA H200")])
def test_compile_devices_are_the_named_chips(name, kind):
    devices = compile_devices(parse_topology(name))
    assert len(devices) == 8 and {d.device_kind for d in devices} == {kind} and devices[0].platform == "gpu"


def test_the_train_program_for_h100_runs_the_triton_kernels():
    """A CPU process compiling for GPUs builds the flash kernels for the target (Triton custom calls: the
    policy's forward, dq and dk/dv, the reference's forward), not the interpreter of its own backend."""
    devices = compile_devices(parse_topology("h100:8"))
    counts = {}
    for impl in ("xla", "pallas"):
        compiled, _ = compile_program(load_config(None, [f"model.attention={impl}"]), devices)
        counts[impl] = compiled.as_text().count("__gpu$xla.gpu.triton")
    assert counts == {"xla": 0, "pallas": 4}


def test_a_missing_cuda_plugin_is_one_line_naming_the_packages(monkeypatch):
    from maxdpo import topology

    real = importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec",
                        lambda name: None if name.startswith("jax_plugins") else real(name))
    with pytest.raises(TopologyError, match=r'needs the CUDA plugin of this jax: pip install "jax-cuda13-plugin==\S+" '
                                            r'"jax-cuda13-pjrt==\S+"'):
        compile_devices(parse_topology("h100:8"))


def test_grouped_matmul_compiles_for_h100_at_the_mixtral_shape():
    """Mixtral-8x7B experts, forward + backward, through Triton and ptxas: the three forward matmuls, their
    input gradients and weight gradients (the forward kernel's loop bounds once failed Triton's parse)."""
    import jax

    from tools.kernel_resources import compile_grouped_matmul

    mesh = jax.sharding.Mesh(compile_devices(parse_topology("h100:1")), ("x",))
    compiled = compile_grouped_matmul(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert compiled.as_text().count("__gpu$xla.gpu.triton") == 9  # 3 forward, 3 d_lhs, 3 d_rhs


def test_every_gpu_kernel_builds_for_h100_without_spills(tmp_path):
    """tools/kernel_resources.py compiles every flash-attention variant the models use (head_dim 64/128/256,
    GQA, MQA, window + soft-cap, packed segments, prefix sharing; forward, dq, dk/dv) and the grouped matmuls
    at the Mixtral shape to SASS with ptxas: none spills or comes near 255 registers, and each launch's
    shared memory fits an SM."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    report = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, "-m", "tools.kernel_resources", "--json", str(report)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())
    attention = {(r["function"], r["kernel"]) for r in rows if r["kernel"].startswith("flash_attention")}
    from tools.kernel_resources import attention_variants
    assert attention == {(name, kernel) for name in attention_variants([64, 128, 256])
                         for kernel in ("flash_attention_forward", "flash_attention_dq", "flash_attention_dkv")}
    matmuls = [r["kernel"].split("__")[0] for r in rows if r["kernel"].startswith("grouped_matmul")]
    # 9 calls (3 forward, 3 d_lhs, 3 d_rhs); XLA keeps one PTX kernel for identical ones
    assert len(matmuls) >= 6 and set(matmuls) == {"grouped_matmul", "grouped_matmul_weight_grad"}
    assert all(r["spill_stores"] == r["spill_loads"] == 0 for r in rows)
    assert max(r["registers"] for r in rows) <= 224  # headroom under the 255 limit (the h64 forward sat at 251)
    assert all(0 < r["shared_bytes"] <= 227 * 1024 and r["blocks_per_sm"] >= 1 for r in rows)


@pytest.mark.parametrize("topology,layout,gpus", [
    ("h100:1", ["mesh.data=1"], 1),
    ("h100:8", ["mesh.data=1", "mesh.fsdp=8", "trainer.batch_size=64", "trainer.micro_batch_size=8"], 8)])
def test_the_1b_llama_dpo_step_compiles_and_fits_h100(tmp_path, topology, layout, gpus):
    """configs/bench_llama3_1b_dpo.yaml (the Llama-3.2-1B shape, DPO with the reference on device, seq 2048,
    Pallas attention; the step tools/gpu_check.py runs on a GPU): XLA:GPU's plan
    holds the fp32 policy, its two Adam moments and the reference in bf16, the compute dtype (14 bytes a
    parameter, split over the GPUs) as arguments, and fits an H100."""
    import json

    from maxdpo import compile as aot

    out = tmp_path / "report.json"
    assert aot.main(["bench_llama3_1b_dpo.yaml", "--topology", topology, *layout, "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())
    memory = report["gb_per_device"]
    state = 14 * report["params_billion"] / gpus  # GB
    assert state <= memory["arguments"] < 1.02 * state + 0.1
    assert report["fits"] and memory["total"] < 80 and report["devices"] == gpus


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_fsdp_gathers_weights_in_the_compute_dtype(param_dtype):
    """The 1B Llama step on h100:8 (fsdp 8, bf16 compute): every all-gather that moves a weight (>= 1M
    elements) carries bf16, cast on the shards before the gather, whatever dtype the weights are kept in."""
    import math
    import re

    cfg = load_config("bench_llama3_1b_dpo.yaml", ["mesh.data=1", "mesh.fsdp=8", "trainer.batch_size=8",
                                                   "trainer.micro_batch_size=8", f"model.param_dtype={param_dtype}"])
    compiled, _ = compile_program(cfg, compile_devices(parse_topology("h100:8")))
    gathered = set()
    for line in compiled.as_text().splitlines():
        result = re.search(r"= (.*) all-gather(?:-start)?\(", line)
        for dtype, dims in re.findall(r"(\w+)\[([\d,]+)\]", result.group(1) if result else ""):
            if math.prod(int(d) for d in dims.split(",")) >= 1 << 20:
                gathered.add(dtype)
    assert gathered == {"bf16"}
