"""DCTLSA as a pretrained teacher (teacher.source: dctlsa; issue 26): the authors' files, pinned by
sha256, saved on a CUDA device and loaded here on the CPU by spandrel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import SHARED, make_pairs, run_cache_teacher, run_teacher, tiny_params
from sharpkd import fetch
from sharpkd.data.datasets import TrainPatches
from sharpkd.fetch import file_digest
from sharpkd.models.teacher_loader import load_spandrel, load_teacher
from sharpkd.tensors import run_tiled

torch.set_num_threads(1)

WEIGHTS = SHARED / "weights"


def official(scale: int):
    path = WEIGHTS / fetch.PRETRAINED[f"dctlsa_x{scale}"]["filename"]
    if not path.is_file():
        pytest.skip(f"{path} absent (official DCTLSA weights not on this machine)")
    return path


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_official_files_match_their_pins_and_load_on_the_cpu(scale):
    path = official(scale)
    assert file_digest(path) == fetch.PRETRAINED[f"dctlsa_x{scale}"]["sha256"]
    model, arch, got = load_spandrel(path, scale)
    assert arch == "DCTLSA" and got == scale
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 12, 16)).shape == (1, 3, 12 * scale, 16 * scale)


def test_build_teacher_dctlsa_then_cache(tmp_path):
    path = official(2)
    make_pairs(tmp_path, tiny_params())
    pairs = tmp_path / "data" / "pairs"
    params = tiny_params(teacher={"source": "dctlsa", "feature_channels": 0}, weights={"dir": str(WEIGHTS)})
    info = run_teacher(params, pairs, tmp_path / "teacher")
    assert info["architecture"] == "DCTLSA" and info["loader"] == "spandrel" and info["scale"] == 2
    assert info["sha256"] == file_digest(path) == fetch.PRETRAINED["dctlsa_x2"]["sha256"]
    assert "zengkun301/DCTLSA" in info["origin"]
    assert info["feature_layers"] == ["LR_conv"]  # the default tap for feature KD

    model, saved = load_teacher(tmp_path / "teacher")
    assert saved == json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    run_cache_teacher(params, pairs, tmp_path / "teacher", tmp_path / "cache")
    train = TrainPatches(
        pairs, tmp_path / "cache", keys=("lr", "teacher"), patch_size=params.data.patch_size
    ).pools[0]
    lr, out = train.image("lr", 0), train.image("teacher", 0)
    assert out.shape == (lr.shape[0] * 2, lr.shape[1] * 2, 3)
    again = run_tiled(model, np.array(lr), 2, params.infer.tile, params.infer.overlap)
    assert np.abs(again.astype(int) - out.astype(int)).max() <= 1
