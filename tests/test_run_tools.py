"""Around a run: `maxdpo.plot` curves (several runs overlaid, the export's model card embedding them), the optional
Weights & Biases logger (offline), and the `maxdpo` console script dispatching to every command."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from maxdpo import cli, plot, train


def _fake_run(folder: Path, shift: float) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, 11):
        rows.append({"step": step, "loss": 0.69 - shift * step, "rewards/margins": shift * step,
                     "rewards/accuracies": min(1.0, 0.5 + shift * step), "logps/chosen": -20 + step,
                     "logps/rejected": -20 - step, "learning_rate": 1e-3 * (1 - step / 10)})
        if step % 5 == 0:
            rows.append({"step": step, "eval_loss": 0.7 - shift * step, "eval_rewards/margins": shift * step,
                         "eval_logps/chosen": -21 + step, "eval_logps/rejected": -21 - step})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_plot_overlays_runs(tmp_path):
    import matplotlib.image

    runs = [_fake_run(tmp_path / "a", 0.01), _fake_run(tmp_path / "b", 0.03)]
    out = tmp_path / "curves.png"
    assert plot.main([*map(str, runs), "-o", str(out), "--labels", "lr 1e-3", "lr 3e-3"]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[1] > image.shape[0] and image[..., :3].std() > 0.05  # 2 x 3 panels, not blank
    assert plot.main([str(runs[0]), "--labels", "x", "y", "-o", str(out)]) == 2
    assert plot.main([str(tmp_path / "missing"), "-o", str(out)]) == 2


def test_the_console_script_dispatches_to_every_command(tmp_path, capsys):
    assert cli.main(["--help"]) == 0
    assert set(cli.COMMANDS) <= set(capsys.readouterr().out.split())
    assert cli.main([]) == 2 and cli.main(["nope"]) == 2
    run = _fake_run(tmp_path / "run", 0.02)
    assert cli.main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0 and (tmp_path / "c.png").is_file()
    script = Path(sys.executable).parent / "maxdpo"  # installed by `pip install -e .`
    result = subprocess.run([str(script), "export", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "python -m maxdpo.export" in result.stdout


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks, records cut into FULL / FIRST / MIDDLE / LAST chunks with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block, index, pending, records = path.read_bytes(), 32768, 7, b"", []
    while index + 7 <= len(data):
        if block - index % block < 7:  # a block's tail too short for a header is padding
            index += block - index % block
            continue
        _, length, kind = struct.unpack("<IHB", data[index:index + 7])
        payload = data[index + 7:index + 7 + length]
        index += 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_a_run_logs_to_wandb_offline_and_its_card_embeds_its_curves(tmp_path, monkeypatch):
    """`log.wandb: true` with WANDB_MODE=offline: the run's W&B folder holds the run (project, name, tags), the
    resolved config, and every logged row of metrics.jsonl under the same names and steps; the export's model
    card shows curves.png."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert train.main(["trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=3", "log.wandb=true",
                       "log.project=tests", "log.tags=[tiny]", f"run.output_dir={run}"]) == 0
    (log_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = {}
    for record in wandb_records(log_file):
        records.setdefault(record.WhichOneof("record_type"), []).append(record)
    (info,) = records["run"]
    assert (info.run.project, info.run.display_name, list(info.run.tags)) == ("tests", "tiny_llama_dpo", ["tiny"])
    config = {item.key: json.loads(item.value_json) for item in info.run.config.update}
    assert config["dpo"]["loss"] == "sigmoid" and config["trainer"]["max_steps"] == 3
    logged = {}
    for record in records["history"]:
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        logged[items.pop("_step")] = items
    rows = {}
    for row in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        rows.setdefault(row.pop("step"), {}).update(row)
    assert sorted(logged) == sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        for name, value in row.items():
            assert logged[step][name] == pytest.approx(value, rel=1e-12), (step, name)
    card = (run / "hf" / "README.md").read_text()
    assert "![Training curves" in card and (run / "hf" / "curves.png").is_file()
