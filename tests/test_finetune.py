"""Fine-tuning from a trained student: student.init (a zoo name or a .pth), rep blocks set to a folded
student's convs, the architecture check, and distill.keep."""

from __future__ import annotations

import math

import pytest
import torch

from sharpkd.config import ConfigError, params_from_dict
from sharpkd.deploy import zoo
from sharpkd.distillation import build_student
from sharpkd.errors import UserError
from sharpkd.finetune import check_init, init_from, init_source
from sharpkd.models.rep import RepConv3x3
from sharpkd.models.student import Student, save_student
from sharpkd.train import TrainState
from tests.helpers import repo_params_dict


def _params(**student):
    raw = repo_params_dict()
    raw["student"].update(student)
    return params_from_dict(raw)


def _trained(channels=8, blocks=2, block="rep") -> Student:
    torch.manual_seed(1)
    model = Student(4, channels, blocks, block=block)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.deploy()


@pytest.mark.parametrize("identity", [True, False])
def test_load_folded_makes_a_rep_block_compute_the_given_conv(identity):
    torch.manual_seed(0)
    block = RepConv3x3(6, 6, identity=identity)
    weight, bias = torch.randn(6, 6, 3, 3), torch.randn(6)
    block.load_folded(weight, bias)
    folded_w, folded_b = block.folded_weight_bias()
    assert torch.allclose(folded_w, weight, atol=1e-6) and torch.allclose(folded_b, bias, atol=1e-6)
    # The other branches keep their weights: they still get gradients (none is zeroed).
    assert block.expand_3x3.weight.abs().sum() > 0 and block.edge_1x1.weight.abs().sum() > 0


@pytest.mark.parametrize("block", ["rep", "plain"])
def test_init_from_a_pth_starts_training_at_that_student(tmp_path, block):
    source = _trained()
    save_student(source, tmp_path / "student.pth")
    params = _params(channels=8, blocks=2, block=block, init=str(tmp_path / "student.pth"))
    student = build_student(params)
    init_from(student, params)
    x = torch.rand(1, 3, 40, 36)
    with torch.no_grad():
        assert (student(x) - source(x)).abs().max() < 1e-5
    assert init_source(params)[1] == zoo.sha256(tmp_path / "student.pth")


def test_a_student_of_another_size_is_one_line_naming_the_keys(tmp_path):
    save_student(_trained(channels=8, blocks=2), tmp_path / "s.pth")
    params = _params(channels=16, blocks=3, init=str(tmp_path / "s.pth"))
    with pytest.raises(UserError) as err:
        check_init(params)
    message = str(err.value)
    assert "\n" not in message and "student.channels=8 student.blocks=2" in message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("weights.onnx", "give zoo:NAME"),
        ("/nonexistent/student.pth", "no such file"),
    ],
)
def test_bad_student_init_values_fail_when_params_load(value, message):
    with pytest.raises(ConfigError, match=message):
        _params(init=value)


def test_an_unknown_zoo_student_is_one_line_listing_the_known_ones():
    with pytest.raises(UserError, match="no such student in the zoo"):
        check_init(_params(init="zoo:nosuch"))


def test_a_file_that_is_not_a_student_is_refused_by_name(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: not a sharpkd student checkpoint"):
        check_init(_params(init=str(bad)))


def test_every_zoo_student_starts_a_fine_tune_of_its_size():
    for name in zoo.names():
        arch = zoo.card(name)["arch"]
        params = _params(channels=arch["channels"], blocks=arch["blocks"], init=f"zoo:{name}")
        student = build_student(params)
        init_from(student, params)
        from sharpkd.models.student import load_student

        shipped = load_student(zoo.zoo_file(f"zoo:{name}", "pth").path)
        x = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            assert (student(x) - shipped(x)).abs().max() < 1e-4


def test_keep_last_keeps_every_validation_and_best_keeps_the_best():
    model = torch.nn.Linear(2, 2)
    scores = iter([30.0, 29.0, 29.5])
    best, last = TrainState(), TrainState()
    for step in (1, 2, 3):
        psnr = next(scores)
        best.validate(model, lambda p=psnr: {"psnr": p}, step)
        last.validate(model, lambda p=psnr: {"psnr": p}, step, keep_last=True)
    assert best.best_step == 1 and math.isclose(best.best["psnr"], 30.0)
    assert last.best_step == 3 and math.isclose(last.best["psnr"], 29.5)
