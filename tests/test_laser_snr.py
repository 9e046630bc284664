"""tools/laser_snr.py: the laserRMT SNR against hand computations and planted signals, and the trainer
honouring the freeze YAML it writes."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_models import tiny_hf
from maxdpo.checkpoint.hf import load_params, save_params, spec_from_pretrained
from maxdpo.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from maxdpo.config import FreezeConfig
from maxdpo.dpo.freeze import trainable_split

from tools import laser_snr

TOOL = Path(laser_snr.__file__)

NOISE_SHAPES = [(64, 128), (128, 128), (128, 64), (200, 50)]


def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(rows, cols)))[0]


def planted(rng: np.random.Generator, noise: np.ndarray, rank: int, strength: float) -> np.ndarray:
    """`noise` (entry std sigma) plus a rank-`rank` signal whose singular values are `strength` times the MP
    edge sigma * (sqrt(n) + sqrt(m)), sigma measured from `noise`."""
    n, m = noise.shape
    edge = noise.std() * (math.sqrt(n) + math.sqrt(m))
    u, v = orthonormal(rng, n, rank), orthonormal(rng, m, rank)
    return (noise + strength * edge * u @ v.T).astype(noise.dtype)


@pytest.mark.parametrize("beta,shape", [(1.0, (400, 400)), (0.5, (300, 600))])
def test_mp_median_matches_sampled_noise(beta, shape):
    s = np.linalg.svd(np.random.default_rng(0).normal(size=shape), compute_uv=False)
    assert np.median(s) / math.sqrt(max(shape)) == pytest.approx(laser_snr.mp_median(beta), rel=0.01)


def test_snr_matches_hand_computation():
    """W = U diag(s) V^T with known s: laserRMT's IQR scale, MP threshold and SNR / max(S) by hand."""
    rng = np.random.default_rng(0)
    s = np.array([10.0, 8.0, 1.0, 0.9, 0.8, 0.7])
    w = orthonormal(rng, 6, 6) @ np.diag(s) @ orthonormal(rng, 10, 6).T  # 6 x 10, beta = 0.6
    # numpy/torch linear quantiles of [0.7, 0.8, 0.9, 1, 8, 10]: positions 1.25 and 3.75
    q25, q75 = 0.8 + 0.25 * (0.9 - 0.8), 1.0 + 0.75 * (8.0 - 1.0)
    threshold = (q75 - q25) / 1.349 * (1 + math.sqrt(0.6))
    assert 1.0 < threshold < 8.0
    snr = (10 + 8) / (1 + 0.9 + 0.8 + 0.7)
    got = laser_snr.matrix_snr(w, "laserrmt")
    assert got.threshold == pytest.approx(threshold)
    assert got.num_signal == 2
    assert got.snr == pytest.approx(snr)
    assert got.score == pytest.approx(snr / 10)

    mp = laser_snr.matrix_snr(w.T, "mp")  # orientation does not matter
    assert mp.threshold == pytest.approx(0.95 / laser_snr.mp_median(0.6) * (1 + math.sqrt(0.6)))
    above = s[s > mp.threshold]
    assert mp.score == mp.snr == pytest.approx(above.sum() / s[s <= mp.threshold].sum())


@pytest.mark.parametrize("shape", NOISE_SHAPES)
def test_pure_noise_stays_under_the_mp_edge(shape):
    """The MP edge sigma * (sqrt(n) + sqrt(m)) is asymptotic: at these sizes the top singular value of noise
    crosses it in ~15% of draws, by a few percent (Tracy-Widom fluctuations); the mp score stays near 0."""
    n, m = shape
    sigma, edge = 0.02, 0.02 * (math.sqrt(n) + math.sqrt(m))
    tops, scores = [], []
    for seed in range(50):
        s = np.linalg.svd(np.random.default_rng(seed).normal(scale=sigma, size=shape), compute_uv=False)
        got = laser_snr.spectrum_snr(s, shape, "mp")
        assert got.threshold == pytest.approx(edge, rel=0.05)  # the median-based scale estimate
        assert got.num_signal <= 2
        tops.append(s[0] / edge)
        scores.append(got.score)
    assert np.mean(np.array(tops) < 1) >= 0.75 and max(tops) < 1.06
    assert np.mean(scores) < 0.02 and max(scores) < 0.1


def test_laserrmt_iqr_scale_counts_noise_as_signal():
    """The documented quirk of the faithful score: IQR / 1.349 is not the MP scale, so pure noise has many
    singular values above laserRMT's threshold (and a tall matrix all of them)."""
    w = np.random.default_rng(0).normal(size=(128, 128))
    assert laser_snr.matrix_snr(w, "laserrmt").num_signal > 10
    assert laser_snr.matrix_snr(np.random.default_rng(0).normal(size=(200, 50)), "laserrmt").snr == math.inf


@pytest.mark.parametrize("shape", [(128, 256), (96, 96)])
def test_planted_signal_is_exactly_what_lies_above_the_edge(shape):
    rank, scores = 3, []
    for strength in (1.5, 2.0, 4.0, 8.0):
        rng = np.random.default_rng(1)
        w = planted(rng, rng.normal(size=shape), rank, strength)
        s = np.linalg.svd(w, compute_uv=False)
        got = laser_snr.spectrum_snr(s, shape, "mp")
        assert got.num_signal == rank
        assert s[rank - 1] > got.threshold >= s[rank]
        edge = math.sqrt(shape[0]) + math.sqrt(shape[1])
        assert np.all(np.abs(s[:rank] / (strength * edge) - 1) < 0.25)  # the planted values, perturbed
        scores.append(got.score)
    assert scores == sorted(scores) and scores[0] > 0.05


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma")
    tiny_hf(path, "gemma", seed=0)
    return path


def plant(src: Path, dst: Path, names: list[str]) -> Path:
    """Copy of the HF folder `src` with rank-2 signal planted in the tensors `names`."""
    shutil.copytree(src, dst)
    file = SafetensorsFile(dst / "model.safetensors")
    rng = np.random.default_rng(0)
    tensors = [(name, planted(rng, np.array(file.get(name)), 2, 4.0) if name in names else np.array(file.get(name)))
               for name in file.keys()]
    write_safetensors(dst / "model.safetensors", tensors, file.metadata)
    return dst


def masks_for(path: Path, patterns: list[str]) -> dict:
    family, spec = spec_from_pretrained(path)
    return trainable_split(spec, family, FreezeConfig(trainable=patterns)).masks


def layer_matrices(layer: int) -> list[str]:
    return [f"model.layers.{layer}.{module}.weight" for module in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_planted_layers_rank_on_top_and_train(gemma_dir, tmp_path):
    path = plant(gemma_dir, tmp_path / "model", layer_matrices(0) + layer_matrices(2))
    matrices = laser_snr.scan(path, "mp")
    assert len(matrices) == 3 * 7 and all(len(m.shape) == 2 for m in matrices)
    rankings = laser_snr.rank(matrices, "layer")
    selected = laser_snr.select(rankings, 0.5)  # ceil(1.5) = 2 of 3 layers
    assert sorted(u.label for u in selected) == ["model.layers.0.", "model.layers.2."]
    patterns = yaml.safe_load(laser_snr.freeze_yaml(selected))["freeze"]["trainable"]
    assert sorted(patterns) == [r"^model\.layers\.0\.", r"^model\.layers\.2\."]
    for key, mask in masks_for(path, patterns).items():
        if key.startswith("layers/"):
            assert np.array_equal(mask, [True, False, True]), key
        else:
            assert mask is False, key  # embeddings, final norm


def test_planted_matrices_rank_on_top_by_matrix_and_by_family(gemma_dir, tmp_path):
    chosen = ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    path = plant(gemma_dir, tmp_path / "model", chosen)
    matrices = laser_snr.scan(path, "mp")
    patterns = [u.pattern for u in laser_snr.select(laser_snr.rank(matrices, "matrix"), 2 / 21)]
    assert sorted(patterns) == sorted(f"^{name}$".replace(".", r"\.") for name in chosen)
    masks = masks_for(path, patterns)
    assert np.array_equal(masks["layers/mlp/down_proj"], [False, True, False])
    assert np.array_equal(masks["layers/attn/q_proj"], [True, False, False])
    assert sum(mask is not False for mask in masks.values()) == 2

    by_family = laser_snr.rank(matrices, "family")
    assert len(by_family) == 7 and all(len(group) == 3 for group in by_family.values())
    assert by_family["mlp.down_proj"][0].label == chosen[0]
    assert by_family["self_attn.q_proj"][0].label == chosen[1]


def test_families_restrict_the_scan_and_the_layer_patterns(gemma_dir, tmp_path):
    matrices = laser_snr.scan(gemma_dir, "mp", ("mlp",))
    assert {m.family for m in matrices} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    patterns = [u.pattern for u in laser_snr.select(laser_snr.rank(matrices, "layer", ("mlp",)), 1 / 3)]
    masks = masks_for(gemma_dir, patterns)
    assert all(masks[k] is False for k in masks if not k.startswith("layers/mlp/"))
    assert all(int(np.sum(masks[f"layers/mlp/{k}"])) == 1 for k in ("gate_proj", "up_proj", "down_proj"))


def test_sharded_checkpoint_scans_like_the_single_file(gemma_dir, tmp_path):
    family, spec = spec_from_pretrained(gemma_dir)
    save_params(spec, load_params(gemma_dir, spec, family), tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single, sharded = laser_snr.scan(gemma_dir), laser_snr.scan(tmp_path)
    assert [(m.name, m.shape) for m in single] == [(m.name, m.shape) for m in sharded]
    assert np.allclose([m.snr.score for m in single], [m.snr.score for m in sharded])


def test_select_takes_the_ceiling_of_each_ranking():
    units = [laser_snr.Unit(str(i), f"^{i}$", float(-i)) for i in range(100)]
    assert [len(laser_snr.select({"all": units}, f)) for f in (0.001, 0.07, 0.071, 1.0)] == [1, 7, 8, 100]
    assert laser_snr.select({"all": units}, 0.07) == units[:7]  # the best, in order
    assert len(laser_snr.select({"a": units[:3], "b": units[:10]}, 0.5)) == 2 + 5


def test_errors_name_the_problem(gemma_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match=str(tmp_path / "missing")):
        laser_snr.main([str(tmp_path / "missing"), "--top-fraction", "0.5"])
    with pytest.raises(SystemExit, match="matches --families nothing_like_this"):
        laser_snr.main([str(gemma_dir), "--top-fraction", "0.5", "--families", "nothing_like_this"])
    for fraction in ("0", "1.5"):
        with pytest.raises(SystemExit):
            laser_snr.main([str(gemma_dir), "--top-fraction", fraction])
        assert "--top-fraction must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be in"):
        laser_snr.select({}, 0.0)
    shutil.copytree(gemma_dir, tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match="has neither model.safetensors"):
        laser_snr.main([str(tmp_path / "broken"), "--top-fraction", "0.5"])


def test_cli_writes_a_yaml_with_the_ranking(gemma_dir, tmp_path):
    out = tmp_path / "freeze.yaml"
    result = subprocess.run([sys.executable, str(TOOL), str(gemma_dir), "--top-fraction", "0.5", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model.layers.2." in result.stdout
    text = out.read_text()
    assert text.startswith("# laser SNR of") and "# rank  score" in text
    patterns = yaml.safe_load(text)["freeze"]["trainable"]
    assert len(patterns) == 2
    masks_for(gemma_dir, patterns)  # every pattern matches a tensor
