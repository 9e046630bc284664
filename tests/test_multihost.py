"""Multi-host: 2 processes x 4 CPU devices on localhost (jax.distributed, gloo collectives) train the same run
as 1 process x 8 devices: the same loss curve and evaluation, one set of checkpoints and one export."""
import json
import os
import socket
import subprocess
import sys

import pytest

ARGS = ["trainer.max_steps=12", "trainer.log_every=2", "trainer.save_every=6", "trainer.eval_every=6"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu", **extra}


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    command = [sys.executable, "-m", "maxdpo.train", *ARGS]
    single = subprocess.run(command + [f"run.output_dir={tmp_path / 'one'}"], env=_env(8), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a process
    sinks = [log.open("w") for log in logs]
    processes = [subprocess.Popen(command + [f"run.output_dir={tmp_path / 'two'}", "reference.precompute=true"],
                                  env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                           JAX_PROCESS_ID=str(i)),
                                  cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=sinks[i])
                 for i in range(2)]
    try:
        for process in processes:
            process.wait(timeout=600)
    except subprocess.TimeoutExpired:  # say where each process was (a hang has shown up once under CI load)
        tails = "\n".join(f"process {i}: ...{log.read_text()[-1500:]}" for i, log in enumerate(logs))
        raise AssertionError(f"the two-process run did not finish in 600 s:\n{tails}") from None
    finally:
        for process, sink in zip(processes, sinks):
            process.kill()
            sink.close()
    for i, (process, log) in enumerate(zip(processes, logs)):
        err = log.read_text()
        assert process.returncode == 0, err[-3000:]
        assert f"process {i} of 2" in err

    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [sorted(r) for r in one] == [sorted(r) for r in two] and len(one) == 8  # 6 train rows, 2 evaluations
    for a, b in zip(one, two):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]
    assert (tmp_path / "two" / "hf" / "model.safetensors").is_file()
    assert "process 0 of 1" in single.stderr
