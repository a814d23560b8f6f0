"""Teacher ensembles (issue 26): the 8-fold self-ensemble (teacher.self_ensemble) and the mean of several
pretrained teachers (teacher.ensemble), cached once; features still come from teacher.source alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import SHARED, make_pairs, run_cache_teacher, run_teacher, tiny_params
from sharpkd import evaluation, fetch
from sharpkd.config import ENSEMBLE_SOURCES, ConfigError
from sharpkd.data.datasets import TrainPatches
from sharpkd.fetch import file_digest
from sharpkd.models.edsr import EDSR
from sharpkd.models.student import Student
from sharpkd.models.teacher_loader import TeacherEnsemble, load_spandrel, load_teacher
from sharpkd.teacher_cache import FeatureTap, Teacher, make_runner
from sharpkd.teachers import TEACHER_SOURCES
from sharpkd.tensors import run_tiled, tiled_apply

torch.set_num_threads(1)

WEIGHTS = SHARED / "weights"


def edsr(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = EDSR(scale=2, channels=8, blocks=1)
    for p in model.parameters():  # away from the identity-like init, so each member differs
        nn.init.normal_(p, std=0.2)
    return model.eval()


def dihedral_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The self-ensemble written out: each of the 8 flips/turns of x, the output turned back, the mean."""
    outs = []
    for mirrored in (False, True):
        for k in range(4):
            t = torch.flip(x, dims=[3]) if mirrored else x
            y = torch.rot90(model(torch.rot90(t, k, dims=[2, 3])), -k, dims=[2, 3])
            outs.append((torch.flip(y, dims=[3]) if mirrored else y).clamp(0, 1))
    return torch.stack(outs).mean(0)


@torch.no_grad()
def test_self_ensemble_is_the_mean_of_the_8_transforms_and_invariant():
    model = edsr(0)
    ens = TeacherEnsemble([model], self_ensemble=True).eval()
    x = torch.rand(1, 3, 10, 14, generator=torch.Generator().manual_seed(1))  # not square: turns swap sides
    out = ens(x)
    assert out.shape == (1, 3, 20, 28)
    assert (out - dihedral_mean(model, x)).abs().max() < 1e-6
    assert (out - model(x).clamp(0, 1)).abs().max() > 1e-3  # the model itself is not equivariant
    # Whatever the model, its self-ensemble is: a flipped or turned input gives the output flipped or turned.
    assert (ens(x.flip(-1)) - out.flip(-1)).abs().max() < 1e-6
    assert (ens(x.rot90(1, (-2, -1))) - out.rot90(1, (-2, -1))).abs().max() < 1e-6


@torch.no_grad()
def test_self_ensemble_of_an_equivariant_model_is_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Upsample(scale_factor=2, mode="nearest"), nn.Sigmoid())
    x = torch.rand(2, 3, 9, 12)
    assert (TeacherEnsemble([model], self_ensemble=True)(x) - model(x)).abs().max() < 1e-6


@torch.no_grad()
def test_ensemble_of_two_is_the_mean_of_their_outputs_also_tiled():
    a, b = edsr(0), edsr(1)
    ens = TeacherEnsemble([a, b], self_ensemble=False).eval()
    x = torch.rand(1, 3, 64, 100, generator=torch.Generator().manual_seed(2))
    mean = (a(x).clamp(0, 1) + b(x).clamp(0, 1)) / 2
    assert (ens(x) - mean).abs().max() < 1e-6
    # The one tiled path takes it as any module (EDSR's receptive field is under overlap/4).
    tiled = tiled_apply(ens, x, scale=2, tile=48, overlap=24)
    assert (tiled - mean).abs().max() < 1e-5


@torch.no_grad()
def test_features_are_the_named_teachers_of_the_plain_input():
    named, other = edsr(0), edsr(1)
    ens = TeacherEnsemble([named, other], self_ensemble=True).eval()
    x = torch.rand(1, 3, 12, 10)
    tap = FeatureTap(ens, ["body"])  # a module name of the named teacher, not of the wrapper
    ens(x)
    alone = FeatureTap(named, ["body"])
    named(x)
    assert torch.equal(tap.features(), alone.features())
    tap.close()
    alone.close()


# ---------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("teacher", "words"),
    [
        ({"source": "pan", "ensemble": ["train"]}, "lists 'train'"),
        ({"source": "pan", "ensemble": ["checkpoint"]}, "lists 'checkpoint'"),
        ({"source": "pan", "ensemble": ["dctlsa", "dctlsa"]}, "twice"),
        ({"source": "pan", "ensemble": ["pan"]}, "teacher.source already"),
        ({"source": "pan", "ensemble": "dctlsa"}, "must be a list"),
        ({"source": "pan", "ensemble": ["edsr"]}, "pretrained teachers"),
        ({"source": "pan", "self_ensemble": "yes"}, None),
    ],
)
def test_bad_ensemble_params_refused(teacher, words):
    key = "teacher.self_ensemble" if words is None else "teacher.ensemble"
    with pytest.raises(ConfigError, match=f"'{key}'") as err:
        tiny_params(teacher=teacher)
    assert words is None or words in str(err.value)


def test_ensemble_sources_are_the_pretrained_teacher_sources():
    assert set(ENSEMBLE_SOURCES) == set(TEACHER_SOURCES) - {"train", "checkpoint"}
    p = tiny_params(teacher={"source": "train", "ensemble": ["pan", "dctlsa"], "self_ensemble": True})
    assert p.teacher.ensemble == ("pan", "dctlsa") and p.teacher.self_ensemble is True


# ---------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    make_pairs(root, tiny_params())
    return root / "data" / "pairs"


def cached(pairs, cache, params, keys=("lr", "teacher")):
    return TrainPatches(pairs, cache, keys=keys, patch_size=params.data.patch_size).pools[0]


def test_self_ensembled_trained_teacher_through_the_stages(pairs, tmp_path):
    params = tiny_params(teacher={"source": "train", "self_ensemble": True})
    name = "EDSR-sharpkd (x8 self-ensemble)"
    info = run_teacher(params, pairs, tmp_path / "teacher")
    assert info["name"] == name and info["self_ensemble"] is True and info["passes"] == 8
    assert info["members"] == [] and info["total_params"] == info["params"]
    model, saved = load_teacher(tmp_path / "teacher")
    assert isinstance(model, TeacherEnsemble) and saved == info

    summary = run_cache_teacher(params, pairs, tmp_path / "teacher", tmp_path / "cache")
    assert summary["teacher"]["name"] == name and summary["teacher"]["passes"] == 8
    assert summary["teacher"]["members"] == [{"source": "train", "sha256": info["sha256"]}]
    train = cached(pairs, tmp_path / "cache", params, ("lr", "teacher", "feat"))
    lr = np.array(train.image("lr", 0))
    again = run_tiled(model, lr, 2, params.infer.tile, params.infer.overlap)
    assert np.abs(again.astype(int) - train.image("teacher", 0).astype(int)).max() <= 1

    # The eval.json facts name what evaluate's teacher row scores.
    facts = evaluation.model_facts(Student(scale=2, channels=8, blocks=1), saved)
    assert facts["teacher.architecture"] == name


def official(name: str, scale: int):
    path = WEIGHTS / fetch.PRETRAINED[f"{name}_x{scale}"]["filename"]
    if not path.is_file():
        pytest.skip(f"{path} absent (official {name} weights not on this machine)")
    return path


def test_dctlsa_plus_pan_cached_as_their_mean(pairs, tmp_path):
    official("dctlsa", 2), official("pan", 2)
    teacher_cfg = {
        "source": "dctlsa",
        "ensemble": ["pan"],
        "feature_layers": ["LR_conv"],
        "feature_channels": 0,
    }
    params = tiny_params(teacher=teacher_cfg, weights={"dir": str(WEIGHTS)})
    folder = tmp_path / "teacher"
    info = run_teacher(params, pairs, folder)
    # The named teacher in models/teacher, the member in members/pan: the official files byte for byte.
    assert info["name"] == "DCTLSA + PAN" and info["architecture"] == "DCTLSA" and info["passes"] == 2
    assert info["sha256"] == fetch.PRETRAINED["dctlsa_x2"]["sha256"]
    assert [m["source"] for m in info["members"]] == ["pan"]
    assert file_digest(folder / "members/pan/teacher.pth") == fetch.PRETRAINED["pan_x2"]["sha256"]
    member = json.loads((folder / "members/pan/teacher.json").read_text())
    assert member["architecture"] == "PAN" and info["total_params"] == info["params"] + member["params"]

    summary = run_cache_teacher(params, pairs, folder, tmp_path / "cache")
    cache_json = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert cache_json["teacher"] == summary["teacher"]
    assert cache_json["teacher"]["name"] == "DCTLSA + PAN" and not cache_json["teacher"]["self_ensemble"]
    assert cache_json["teacher"]["members"] == [
        {"source": "dctlsa", "sha256": fetch.PRETRAINED["dctlsa_x2"]["sha256"]},
        {"source": "pan", "sha256": fetch.PRETRAINED["pan_x2"]["sha256"]},
    ]
    assert summary["feature_layers"] == ["LR_conv"] and summary["feature_channels"] == 55

    train = cached(pairs, tmp_path / "cache", params, ("lr", "teacher", "feat"))
    lr = np.array(train.image("lr", 0))
    dctlsa = load_spandrel(folder / "teacher.pth", 2)[0].eval()
    pan, _ = load_teacher(folder / "members/pan")
    tile, overlap = params.infer.tile, params.infer.overlap
    outs = [run_tiled(m, lr, 2, tile, overlap).astype(np.float32) for m in (dctlsa, pan)]
    assert np.abs((outs[0] + outs[1]) / 2 - train.image("teacher", 0)).max() <= 1

    # The features are DCTLSA's alone: the lone named teacher through the same runner gives them.
    lone = Teacher(dctlsa, {**info, "members": []}, torch.device("cpu"), False)
    runner = make_runner(lone, params, with_features=True)
    _, feat = runner(lr)
    runner.close()
    assert np.abs(feat.astype(np.float32) - train.image("feat", 0).astype(np.float32)).max() < 1e-2
