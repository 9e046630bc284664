"""Bad input or an unusable machine gives one line naming the file, line, key or folder, exit status 2, and
nothing written over a good run folder."""
import json
import subprocess

import pytest

from maxdpo import train
from maxdpo.checkpoint.state import CheckpointStore

GOOD = {"prompt": "add 1 + 2 =", "chosen": " 3", "rejected": " 4"}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [text for text in err.splitlines() if text.startswith("maxdpo:")]
    return line


def _data(tmp_path, content: bytes) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("content,message", [
    (b"", "data file {path} is empty"),
    (json.dumps(GOOD).encode() + b'\n{"prompt": "a" "chosen": " b"}\n',
     "could not read {path} as json: line 2: Expecting ',' delimiter at column 16"),
    (json.dumps(GOOD).encode() + b'\n{"prompt": "\xff", "chosen": " b", "rejected": " c"}\n',
     "{path}: line 2 is not UTF-8 text (byte b'\\xff' at column 13)"),
])
def test_a_bad_data_file_is_one_line_naming_file_and_line(tmp_path, capsys, content, message):
    path = _data(tmp_path, content)
    assert train.main([f"data.train={path}", f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert _one_error_line(capsys) == "maxdpo: error: " + message.format(path=path)


def test_yaml_errors_name_the_file_or_override_and_the_place(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  name: x\n  seed: [1, 2\ndpo:\n  beta: 0.1\n")
    assert train.main([str(config)]) == 2
    assert _one_error_line(capsys) == (f"maxdpo: error: config file {config} is not valid YAML: expected ',' or ']', "
                                       "but got ':' at line 4, column 4")
    assert train.main(["dpo.beta=[0.1"]) == 2
    assert "override 'dpo.beta=[0.1': the value is not valid YAML" in _one_error_line(capsys)


def test_a_truncated_config_json_is_named(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama", "hidden_size": 4')
    assert train.main([f"model.path={tmp_path / 'model'}", f"run.output_dir={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"maxdpo: error: {tmp_path / 'model' / 'config.json'} is not valid JSON")


def test_an_output_folder_that_cannot_be_written_stops_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    missing_data = tmp_path / "never_read.jsonl"  # the folder is checked first: this is never opened
    assert train.main([f"run.output_dir={tmp_path / 'file' / 'run'}", f"data.train={missing_data}"]) == 2
    assert str(tmp_path / "file") in _one_error_line(capsys)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB file system: room for one checkpoint of the default job (4.3 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint_before_it(small_disk, capsys):
    run_dir = small_disk / "run"
    assert train.main(["trainer.max_steps=4", "trainer.save_every=2", "data.eval=null",
                       f"run.output_dir={run_dir}"]) == 2
    assert _one_error_line(capsys) == (
        f"maxdpo: error: could not write a checkpoint in {run_dir / 'checkpoints'}: No space left on device "
        "[os_error_code='28']; the complete checkpoints there (steps [2]) are intact")
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.steps() == [2] and store.read_meta(2)["step"] == 2
    store.close()
