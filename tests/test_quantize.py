"""INT8 static quantisation of an exported student: integer convs, output close to float32, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sharpkd.errors import UserError
from sharpkd.export import export_onnx
from sharpkd.models.student import Student
from sharpkd.quantize import quantize_student, space_to_depth_head
from sharpkd.runtime import SCALE_KEY, ort_session


def _smooth(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Gradients plus a soft blob: image-like, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        for c in range(3):
            a, b, cy, cx = rng.random(4)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
            out[i, c] = 0.1 + 0.5 * (a * yy + (1 - a) * xx) + 0.4 * b * blob
    return out.clip(0, 1)


@pytest.fixture(scope="module")
def fp32_student(tmp_path_factory) -> tuple:
    """A small exported student that is not the identity: random tail and biases (as after training)."""
    torch.manual_seed(0)
    model = Student(scale=2, channels=16, blocks=2)
    with torch.no_grad():
        torch.nn.init.normal_(model.tail.weight, std=0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.normal_(m.bias, std=0.01)
    path = export_onnx(model.eval(), tmp_path_factory.mktemp("fp32") / "student.onnx")
    return model, path


def _calibration() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    noisy = [
        (_smooth(1, 64, 64, s) + 0.05 * rng.standard_normal((1, 3, 64, 64))).clip(0, 1) for s in range(4)
    ]
    return [a.astype(np.float32) for a in noisy] + [_smooth(2, 48, 80, 9)]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_quantize_student(fp32_student, tmp_path):
    model, fp32 = fp32_student
    out = tmp_path / "int8" / "student_int8.onnx"
    info = quantize_student(fp32, out, _calibration())
    assert out.is_file()
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left beside it
    assert info["calibration_batches"] == 5 and info["calibration_images"] == 6
    assert info["quantized_ops"] == {"Conv": 4}  # head, two body convs, tail
    assert info["head"] == "SpaceToDepth + 3x3 conv"
    assert info["uint8_rearrangements"] == ["Pad", "SpaceToDepth", "DepthToSpace", "Slice", "Slice"]
    assert info["method"] == "minmax" and info["format"] == "QDQ"

    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8  # activations + weights
    assert "Relu" not in ops  # folded into the convs' output ranges
    int8_weights = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    conv_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert len(int8_weights & conv_inputs) == 4  # every conv weight is stored as int8
    meta = {e.key: e.value for e in proto.metadata_props}
    assert meta[SCALE_KEY] == "2" and meta["sharpkd.precision"] == "int8"  # the runtime still finds the grid

    # Odd size: the size-dependent padding still works; the output stays close to float32.
    x = _smooth(1, 67, 45, 5)
    ref = ort_session(fp32).run(None, {"input": x})[0]
    with torch.no_grad():
        assert np.abs(ref - model(torch.from_numpy(x)).numpy()).max() < 1e-5
    got = ort_session(out, threads=1).run(None, {"input": x})[0]
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.abs(ref - x).max() > 1e-3  # the student is not the identity: the test means something
    assert _psnr(got, ref) > 35


def test_quantize_options(fp32_student, tmp_path):
    _, fp32 = fp32_student
    info = quantize_student(
        fp32, tmp_path / "q.onnx", _calibration()[:2], per_channel=False, method="percentile"
    )
    assert info["weights"] == "int8 per tensor" and info["quantized_ops"] == {"Conv": 4}
    with pytest.raises(ValueError, match="method"):
        quantize_student(fp32, tmp_path / "q.onnx", _calibration(), method="mse")


def test_quantize_errors(fp32_student, tmp_path):
    _, fp32 = fp32_student
    out = tmp_path / "int8.onnx"
    with pytest.raises(UserError, match="missing.onnx.*not found"):
        quantize_student(tmp_path / "missing.onnx", out, _calibration())
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match="corrupt.onnx.*not a valid ONNX"):
        quantize_student(corrupt, out, _calibration())
    with pytest.raises(UserError, match="student.onnx.*empty calibration"):
        quantize_student(fp32, out, [])
    with pytest.raises(UserError, match=r"calibration array 0 has shape \(3, 8, 8\)"):
        quantize_student(fp32, out, [np.zeros((3, 8, 8), np.float32)])
    assert not out.exists()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_space_to_depth_head_is_the_same_function(scale, tmp_path):
    """The INT8 path's head (SpaceToDepth + 3x3 conv) computes what the exported strided conv computes."""
    torch.manual_seed(scale)
    model = Student(scale=scale, channels=8, blocks=1)
    with torch.no_grad():
        torch.nn.init.normal_(model.tail.weight, std=0.05)
    fp32 = export_onnx(model.eval(), tmp_path / "s.onnx")
    proto = onnx.load(str(fp32))
    assert space_to_depth_head(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("SpaceToDepth") == 1 and ops.count("Conv") == 3
    rewritten = tmp_path / "s2d.onnx"
    onnx.save(proto, str(rewritten))
    for shape in [(1, 3, 37, 53), (2, 3, 65, 31)]:  # odd sizes: the padding to a multiple of the scale
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        ref = ort_session(fp32).run(None, {"input": x})[0]
        assert np.abs(ref - x).max() > 1e-3
        assert np.abs(ort_session(rewritten).run(None, {"input": x})[0] - ref).max() < 1e-5
    assert not space_to_depth_head(proto)  # already rewritten: nothing left to match


def test_rearrangements_run_on_uint8_and_change_nothing(fp32_student, tmp_path, monkeypatch):
    """Pad, SpaceToDepth, DepthToSpace and the crop take uint8 tensors, with the same output as leaving
    them between a DequantizeLinear and a QuantizeLinear."""
    import sharpkd.quantize as quantize

    _, fp32 = fp32_student
    moved = tmp_path / "moved.onnx"
    quantize_student(fp32, moved, _calibration())
    proto = onnx.load(str(moved))
    producers = {out: n for n in proto.graph.node for out in n.output}

    def chain(name: str, length: int) -> list[str]:
        ops = []
        for _ in range(length):
            node = producers[name]
            ops.append(node.op_type)
            name = node.input[0]
        return ops

    (head,) = [n for n in proto.graph.node if n.op_type == "SpaceToDepth"]
    assert chain(head.input[0], 2) == ["Pad", "QuantizeLinear"]  # the input is quantised, then padded
    pad = producers[head.input[0]]
    assert producers[pad.input[0]].input[0] == proto.graph.input[0].name
    (add,) = [n for n in proto.graph.node if n.op_type == "Add"]
    residual = next(i for i in add.input if i != proto.graph.input[0].name)
    # the tail conv's uint8 output is rearranged and cropped, then dequantised for the float32 Add
    assert chain(residual, 5) == ["DequantizeLinear", "Slice", "Slice", "DepthToSpace", "QuantizeLinear"]
    monkeypatch.setattr(quantize, "rearrange_in_uint8", lambda model: [])
    kept = tmp_path / "kept.onnx"
    quantize_student(fp32, kept, _calibration())
    x = _smooth(1, 67, 45, 5)
    a = ort_session(moved, threads=1).run(None, {"input": x})[0]
    b = ort_session(kept, threads=1).run(None, {"input": x})[0]
    assert np.array_equal(a, b)
