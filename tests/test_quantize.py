"""INT8 static quantisation of an exported student: integer convs, output close to float32, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sharpkd.deploy.models import SCALE_KEY
from sharpkd.deploy.sessions import OnnxFunction, ort_session
from sharpkd.deploy.timing import onnx_target, time_target
from sharpkd.errors import UserError
from sharpkd.models.student import Student
from sharpkd.onnx_export import export_onnx
from sharpkd.quantize import quantize_student, residual_on_lr_grid, space_to_depth_head


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


def _bytes(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _psnr8(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _largest_int8_weight(proto) -> int:
    """The largest magnitude among the model's stored int8 tensors (the conv weights)."""
    stored = [
        onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8
    ]
    return max(int(np.abs(w).max()) for w in stored)


def test_quantize_student(fp32_student, tmp_path):
    """The default INT8 model: integer convs and residual, the 8-bit image in and out."""
    model, fp32 = fp32_student
    out = tmp_path / "int8" / "student_int8.onnx"
    info = quantize_student(fp32, out, _calibration())
    assert out.is_file()
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left beside it
    assert info["calibration_batches"] == 5 and info["calibration_images"] == 6
    assert info["quantized_ops"] == {"Add": 1, "Conv": 4}  # head, two body convs, tail; the residual
    assert info["head"] == "SpaceToDepth + 3x3 conv" and info["image_io"] == "uint8"
    assert info["uint8_rearrangements"] == ["Pad", "SpaceToDepth", "DepthToSpace", "Slice", "Slice"]
    assert info["method"] == "minmax" and info["format"] == "QDQ"

    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8  # activations + weights
    assert "Relu" not in ops  # folded into the convs' output ranges
    int8_weights = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    conv_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert len(int8_weights & conv_inputs) == 4  # every conv weight is stored as int8
    # ... in 7 bits, so that no uint8 x int8 pair sum saturates on a CPU without VNNI
    assert info["weights"] == "int8 per channel, 7-bit"
    assert _largest_int8_weight(proto) == 64  # symmetric: [-64, 64], the range used
    meta = {e.key: e.value for e in proto.metadata_props}
    assert meta[SCALE_KEY] == "2" and meta["sharpkd.precision"] == "int8"  # the runtime still finds the grid
    assert "uint8" in meta["sharpkd.io"]
    for value in (proto.graph.input[0], proto.graph.output[0]):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    producers = {o: n for n in proto.graph.node for o in n.output}
    name, chain = proto.graph.output[0].name, []
    for _ in range(5):
        chain.append(producers[name].op_type)
        name = producers[name].input[0]
    # the sum is on the low-resolution grid, quantised to the image's grid, then rearranged and cropped
    assert chain == ["Slice", "Slice", "DepthToSpace", "QuantizeLinear", "Add"]

    # Odd size: the size-dependent padding still works; the 8-bit output stays close to float32's.
    x8 = _bytes(_smooth(1, 67, 45, 5))
    x = x8.astype(np.float32) / 255
    ref = ort_session(fp32).run(None, {"input": x})[0]
    with torch.no_grad():
        assert np.abs(ref - model(torch.from_numpy(x)).numpy()).max() < 1e-5
    got = ort_session(out, threads=1).run(None, {"input": x8})[0]
    assert got.shape == x.shape and got.dtype == np.uint8
    assert np.abs(_bytes(ref).astype(int) - x8).max() > 2  # the student is not the identity
    assert _psnr8(got, _bytes(ref)) > 35
    # nearly the numbers of the float32-I/O INT8 model rounded to 8 bits (its input grid is calibrated)
    float_io = quantize_student(fp32, tmp_path / "f.onnx", _calibration(), image_io="float32")
    assert float_io["quantized_ops"] == {"Conv": 4} and float_io["image_io"] == "float32"
    other = ort_session(tmp_path / "f.onnx", threads=1).run(None, {"input": x})[0]
    assert other.dtype == np.float32
    assert np.abs(_bytes(other).astype(int) - got).max() <= 2 and _psnr8(got, _bytes(other)) > 45

    # OnnxFunction gives it a float image in [0,1] and takes one back; timing feeds it bytes.
    fn = OnnxFunction(ort_session(out, threads=1))
    y = fn(x)
    assert y.dtype == np.float32 and np.array_equal(_bytes(y), got)
    assert fn.native(x).dtype == np.uint8
    target = onnx_target(out, "cpu", 1)
    assert target.precision == "int8" and time_target(target, x, 1) > 0


def _small_student(scale: int, tmp_path, tail_bias: bool = False):
    """An exported 8 x 1 student whose tail is not zero (so its output is not its input), and its proto."""
    torch.manual_seed(scale)
    model = Student(scale=scale, channels=8, blocks=1)
    with torch.no_grad():
        torch.nn.init.normal_(model.tail.weight, std=0.05)
        if tail_bias:
            torch.nn.init.normal_(model.tail.bias, std=0.05)
    fp32 = export_onnx(model.eval(), tmp_path / "s.onnx")
    return fp32, onnx.load(str(fp32))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_residual_on_lr_grid_is_the_same_function(scale, tmp_path):
    """The residual added before the DepthToSpace (tail channels in SpaceToDepth's order) is exact in float."""
    fp32, proto = _small_student(scale, tmp_path, tail_bias=True)
    assert not residual_on_lr_grid(proto)  # needs the SpaceToDepth head
    assert space_to_depth_head(proto) and residual_on_lr_grid(proto)
    rewritten = tmp_path / "lr.onnx"
    onnx.save(proto, str(rewritten))
    for shape in [(1, 3, 37, 53), (2, 3, 65, 31)]:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        ref = ort_session(fp32).run(None, {"input": x})[0]
        assert np.abs(ref - x).max() > 1e-3
        assert np.abs(ort_session(rewritten).run(None, {"input": x})[0] - ref).max() < 1e-5
    assert not residual_on_lr_grid(proto)  # already moved


def test_quantize_options(fp32_student, tmp_path):
    _, fp32 = fp32_student
    info = quantize_student(
        fp32, tmp_path / "q.onnx", _calibration()[:2], per_channel=False, method="percentile"
    )
    assert info["weights"] == "int8 per tensor, 7-bit" and info["quantized_ops"] == {"Add": 1, "Conv": 4}
    info = quantize_student(fp32, tmp_path / "full.onnx", _calibration()[:2], reduce_range=False)
    assert info["weights"] == "int8 per channel"
    assert _largest_int8_weight(onnx.load(str(tmp_path / "full.onnx"))) == 127
    with pytest.raises(ValueError, match="method"):
        quantize_student(fp32, tmp_path / "q.onnx", _calibration(), method="mse")
    with pytest.raises(ValueError, match="image_io"):
        quantize_student(fp32, tmp_path / "q.onnx", _calibration(), image_io="uint16")


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


def test_uint8_io_needs_a_student(tmp_path):
    """A model without a student's head and residual cannot take the 8-bit image: a clear error, no file."""
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).eval()
    other = tmp_path / "not_a_student.onnx"
    axes = {"input": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(
        conv, (torch.rand(1, 3, 16, 16),), str(other), dynamo=False, input_names=["input"], dynamic_axes=axes
    )
    out = tmp_path / "int8.onnx"
    with pytest.raises(UserError, match="not_a_student.onnx.*uint8 image I/O needs a sharpkd student"):
        quantize_student(other, out, _calibration())
    assert not out.exists()
    assert quantize_student(other, out, _calibration(), image_io="float32")["quantized_ops"] == {"Conv": 1}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_space_to_depth_head_is_the_same_function(scale, tmp_path):
    """The INT8 path's head (SpaceToDepth + 3x3 conv) computes what the exported strided conv computes."""
    fp32, proto = _small_student(scale, tmp_path)
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
    them between a DequantizeLinear and a QuantizeLinear (float32 I/O, where the float Add follows)."""
    import sharpkd.quantize as quantize

    _, fp32 = fp32_student
    moved = tmp_path / "moved.onnx"
    quantize_student(fp32, moved, _calibration(), image_io="float32")
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
    quantize_student(fp32, kept, _calibration(), image_io="float32")
    x = _smooth(1, 67, 45, 5)
    a = ort_session(moved, threads=1).run(None, {"input": x})[0]
    b = ort_session(kept, threads=1).run(None, {"input": x})[0]
    assert np.array_equal(a, b)
