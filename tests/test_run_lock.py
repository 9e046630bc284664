"""One writer per run folder: a second `python -m maxdpo.train` on a folder another process writes is refused
with one line naming that process, before it writes anything; the lock of a process that died is taken over."""
import subprocess
import sys
from pathlib import Path

from maxdpo import train

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom maxdpo.run_lock import run_folder_lock\n"
        "with run_folder_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [f"run.output_dir={run_dir}", "trainer.max_steps=2", "data.eval=null"]
        assert train.main(args) == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maxdpo:")]
        assert f"{run_dir} is in use by process {holder.pid}" in error and "run.output_dir" in error
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()  # dies holding the lock: the operating system releases it
        holder.wait()
    assert train.main(args) == 0
    assert (run_dir / "checkpoints" / "2").is_dir()
