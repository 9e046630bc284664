"""An export's folder holds exactly the exported model: an older sharded export is replaced whole (maxdpo and
transformers then load the new weights), a folder holding anything else or a file is refused with one line,
and a failed export leaves the folder as it was with no staging files."""
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import maxdpo
from hf_models import tiny_llama
from maxdpo import export, export_folder
from maxdpo.checkpoint import hf


def _weights(model) -> dict:
    return {"/".join(map(str, path)): np.asarray(value) for path, value in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    tiny_llama(tmp / "a", seed=0)
    tiny_llama(tmp / "b", seed=1)
    return maxdpo.load_pretrained(tmp / "a"), maxdpo.load_pretrained(tmp / "b")


def test_an_older_sharded_export_is_replaced_whole(tmp_path, models):
    old, new = models
    out = tmp_path / "out"
    maxdpo.save_pretrained(old, out, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").is_file()
    maxdpo.save_pretrained(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".out.*"))
    loaded = _weights(maxdpo.load_pretrained(out))
    for name, value in _weights(new).items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        logits = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(new(ids)), logits, atol=1e-4)


def test_a_folder_holding_something_else_or_a_file_is_refused(tmp_path, models, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine is not empty and holds no previous export \\(notes.txt\\)"):
        maxdpo.save_pretrained(models[0], tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    assert export.main([str(tmp_path / "no_run"), str(tmp_path / "file")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"maxdpo: error: export target {tmp_path / 'file'} is a file; give a folder"


def test_a_failed_export_leaves_the_previous_one_and_no_staging_files(tmp_path, models, monkeypatch):
    out = tmp_path / "out"
    maxdpo.save_pretrained(models[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail_midway(spec, params, out_dir, *args, **kwargs):
        (out_dir / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(hf, "save_params", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        maxdpo.save_pretrained(models[1], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_export_killed_between_its_renames_puts_the_previous_one_back(tmp_path, models):
    """Killed after moving the previous export aside and before putting the new one in place: the next export
    restores the previous one first, so a failing export then still leaves it as it was."""
    out = tmp_path / "out"
    maxdpo.save_pretrained(models[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.rename(tmp_path / ".out.999999999.0badc0de.old")
    (tmp_path / ".out.999999999.0badc0de.partial").mkdir()
    export_folder.recover_interrupted(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    maxdpo.save_pretrained(models[1], out)
    (tmp_path / ".out.999999999.0badc0de.old").mkdir()  # beside a complete export: removed
    export_folder.recover_interrupted(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
