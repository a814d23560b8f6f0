"""The student (models/student.py): a rep student folds exactly into the plain one, which is what is
saved and exported (same graph, same cost as a plain student of that width and depth)."""

from __future__ import annotations

import collections

import pytest
import torch

from sharpkd.models.student import Student, conv_macs, load_student, save_student
from sharpkd.onnx_export import ExportGraph, export_onnx


def _trained(block: str, scale: int, steps: int = 5) -> Student:
    """A few real optimisation steps, so every branch of a rep block holds something."""
    torch.manual_seed(scale)
    model = Student(scale=scale, channels=8, blocks=2, block=block)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        x = torch.rand(2, 3, 6 * scale, 5 * scale)
        loss = (model(x) - x.flip(-1)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_rep_student_folds_exactly(scale):
    rep = _trained("rep", scale)
    plain = rep.deploy()
    assert plain.block == "plain" and rep.block == "rep"
    assert all(type(m) is not type(rep.tail) for m in plain.modules())  # no RepConv3x3 left
    with torch.no_grad():
        for shape in [(1, 3, 37, 53), (2, 3, 13, 17)]:
            x = torch.rand(*shape)
            assert (plain(x) - rep(x)).abs().max() < 1e-5
    assert plain.state_dict().keys() == Student(scale=scale, channels=8, blocks=2).state_dict().keys()
    assert conv_macs(plain) == conv_macs(Student(scale=scale, channels=8, blocks=2))


def test_saved_rep_student_loads_as_plain(tmp_path):
    rep = _trained("rep", 2)
    save_student(rep.deploy(), tmp_path / "s.pth")
    loaded = load_student(tmp_path / "s.pth")
    assert loaded.block == "plain"
    x = torch.rand(1, 3, 21, 19)
    with torch.no_grad():
        assert (loaded(x) - rep(x)).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_export_graph_is_the_same_function(scale):
    """pixel_unshuffle + head conv as one strided conv: the exported arithmetic, checked against the student."""
    model = _trained("plain", scale)
    graph = ExportGraph(model).eval()
    with torch.no_grad():
        for shape in [(1, 3, 37, 53), (2, 3, 65, 31)]:
            x = torch.rand(*shape)
            assert (graph(x) - model(x)).abs().max() < 1e-5


def test_rep_and_plain_export_the_same_graph(tmp_path):
    import onnx

    def ops(model, name):
        proto = onnx.load(str(export_onnx(model, tmp_path / name)))
        return collections.Counter(n.op_type for n in proto.graph.node)

    rep, plain = ops(_trained("rep", 4), "rep.onnx"), ops(_trained("plain", 4), "plain.onnx")
    assert rep == plain and rep["Conv"] == 4  # head (strided) + 2 body + tail
