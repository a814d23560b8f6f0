"""INT8 static quantisation of an exported student with ONNX Runtime (QDQ format).

What is quantised, and why (measured on Student(scale=4, channels=32, blocks=4), 1080p, 2 threads):
only the convs and the ReLUs between them. ONNX Runtime's CPU provider fuses each
DequantizeLinear -> Conv (-> Relu) -> QuantizeLinear into one QLinearConv (uint8 x int8,
channels-last). Around them, two rewrites that change no number:
- the exported head (one strided conv with a 12x12 kernel on the 3-channel image at x4, the fast
  form in float32) becomes SpaceToDepth + a 3x3 conv on 48 channels (`space_to_depth_head`): a
  3-channel QLinearConv was the slowest layer of the INT8 model;
- the pixel rearrangements (replicate pad, SpaceToDepth, DepthToSpace, the crop) run on the uint8
  tensors rather than between a DequantizeLinear and a QuantizeLinear in float32
  (`rearrange_in_uint8`): they commute exactly with a per-tensor quantisation and move a quarter
  of the bytes.
The image itself is uint8 in and out (`image_io="uint8"`, the default): the input is the 8-bit
frame (scale 1/255, zero point 0: no QuantizeLinear), the global residual is added on the
low-resolution grid before the DepthToSpace (`residual_on_lr_grid`, exact in float) as one
QLinearAdd whose output grid is the 8-bit image's own, and no float32 tensor of the frame's size is
left. A calibrated output grid would cost about 5 dB; the image's own grid rounds exactly as saving
the float32 model's output to an 8-bit image does (the metrics score uint8-rounded images), and on a
1080p frame the float32 input QuantizeLinear, output DequantizeLinear and Add took about a third of
the 32 x 4 student's INT8 kernel time. `image_io="float32"` keeps float32 I/O (the residual Add in
float32), for comparison. Weights are int8 per output channel in a 7-bit range (`reduce_range`), activations uint8 asymmetric
(ReLU outputs are non-negative; symmetric activations would waste half the range and keep the ReLUs).
The 7 bits are for CPUs without VNNI (AVX2, or AVX512 without VNNI): there ONNX Runtime multiplies
uint8 x int8 with an instruction that adds pairs of products into int16 with saturation, and full-range
weights overflow it. Measured on such a CPU (an AMD EPYC without AVX512; one trained rep 32 x 4):
INT8 cost 0.57 dB on Set5 and 1.33 dB on four Manga109 pages against float32 with full-range weights,
0.01 and 0.05 dB with 7-bit ones. The INT8 file runs wherever it is copied to, so it is written for
the CPU that saturates (what 7 bits cost on a CPU with VNNI is not measured yet).
Calibration is MinMax by default: percentile and entropy measured no better, and clipping
rare large residuals would clip the sharpening at strong edges, where it matters.

The export stage's INT8 model (`export_int8`): calibrated on seeded training-input crops, then scored
against the float32 file by the evaluate stage's own loop (evaluation.score_set over evaluation.eval_sets:
the same images, the same tiling), so `int8.<set>.psnr_cost` compares with eval.json.

`quant_pre_process` is not used: its symbolic shape inference cannot follow the student's
size-dependent padding, and without it the pre-processing changed neither speed nor quality.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sharpkd.config import Params
from sharpkd.data.datasets import TrainPatches
from sharpkd.data.evalsets import EvalImage
from sharpkd.deploy.models import load_model
from sharpkd.errors import UserError
from sharpkd.evaluation import SetResult, eval_sets, method_means, model_method, score_set
from sharpkd.files import atomic_path
from sharpkd.metrics import QualityMetrics, min_side
from sharpkd.tensors import as_torch

# Op types handed to the quantiser: Relu is listed so that it folds into the conv's output range.
OP_TYPES_TO_QUANTIZE = ("Conv", "Relu")
METHODS = ("minmax", "percentile", "entropy")


def _calibration_reader(input_name: str, arrays: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        """Feeds the calibration arrays to the model one by one (each a batch; sizes may differ)."""

        def __init__(self):
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = iter([{input_name: a} for a in arrays])

    return ArrayReader()


def _check_calibration(path: Path, calibration: Sequence[np.ndarray]) -> list[np.ndarray]:
    if len(calibration) == 0:
        raise UserError(f"{path}: cannot quantise with an empty calibration set; give (N,3,H,W) image arrays")
    arrays = []
    for i, a in enumerate(calibration):
        a = np.asarray(a)
        if a.ndim != 4 or a.shape[1] != 3 or a.size == 0:
            raise UserError(f"{path}: calibration array {i} has shape {a.shape}, expected (N,3,H,W)")
        arrays.append(np.ascontiguousarray(a, dtype=np.float32))
    return arrays


def _load_onnx(path: Path):
    import onnx

    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found (export the student first: `dvc repro export`)")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...: all mean "not a usable ONNX file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a valid ONNX model ({first})") from None
    if len(model.graph.input) != 1:
        raise UserError(
            f"{path}: expected a model with one input (a sharpkd student), got {len(model.graph.input)}"
        )
    return model


def integer_ops(model) -> dict[str, int]:
    """Op types that run on quantised tensors: nodes fed by a DequantizeLinear whose outputs are re-quantised.

    In QDQ form these are the nodes ONNX Runtime replaces by integer kernels (Conv -> QLinearConv).
    """
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = any(producers.get(name) == "DequantizeLinear" for name in node.input)
        requantised = all(
            consumers[out] and all(c == "QuantizeLinear" for c in consumers[out]) for out in node.output
        )
        if fed and requantised:
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def space_to_depth_head(model) -> bool:
    """Rewrite the exported head (export.ExportGraph: one conv on the full-size image, kernel 3s, stride s,
    padding s) as SpaceToDepth(s) and a 3x3 conv on 3s² channels: the same arithmetic, regrouped.

    In float32 the strided conv is the faster form; in INT8 a 3-channel QLinearConv is the slowest layer
    of the model, while SpaceToDepth is a pure rearrangement that can run on the uint8 input (see
    `rearrange_in_uint8`). Returns whether a head was found; the model is changed in place.
    """
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        attrs = _attrs(node)
        weight = numpy_helper.to_array(inits[node.input[1]])
        s = list(attrs.get("strides", [1, 1]))[0]
        if (
            weight.ndim != 4
            or weight.shape[1] != 3
            or s < 2
            or list(attrs.get("strides", [])) != [s, s]
            or weight.shape[2:] != (3 * s, 3 * s)
            or list(attrs.get("pads", [])) != [s] * 4
            or attrs.get("group", 1) != 1
            or list(attrs.get("dilations", [1, 1])) != [1, 1]
        ):
            continue
        c_out = weight.shape[0]
        # weight[o, c, dy*s+i, dx*s+j] -> [o, (i*s+j)*3+c, dy, dx]: ONNX SpaceToDepth's channel order (DCR).
        regrouped = (
            weight.reshape(c_out, 3, 3, s, 3, s).transpose(0, 3, 5, 1, 2, 4).reshape(c_out, 3 * s * s, 3, 3)
        )
        name = f"{node.input[1]}_space_to_depth"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(regrouped), name))
        if sum(node.input[1] in n.input for n in model.graph.node) == 1:
            model.graph.initializer.remove(inits[node.input[1]])
        rearranged = f"{node.input[0]}_space_to_depth"
        model.graph.node.insert(
            index, onnx.helper.make_node("SpaceToDepth", [node.input[0]], [rearranged], blocksize=s)
        )
        node.input[0], node.input[1] = rearranged, name
        del node.attribute[:]
        node.attribute.extend(
            [
                onnx.helper.make_attribute("kernel_shape", [3, 3]),
                onnx.helper.make_attribute("strides", [1, 1]),
                onnx.helper.make_attribute("pads", [1, 1, 1, 1]),
                onnx.helper.make_attribute("dilations", [1, 1]),
                onnx.helper.make_attribute("group", 1),
            ]
        )
        return True
    return False


def _rearranges(node) -> bool:
    """Ops that only move, copy or drop values: they commute with a per-tensor quantisation."""
    if node.op_type == "Pad":  # constant padding would have to pad with the zero point
        mode = _attrs(node).get("mode", b"constant")
        return (mode.decode() if isinstance(mode, bytes) else mode) in ("edge", "reflect")
    return node.op_type in ("SpaceToDepth", "DepthToSpace", "Slice")


def rearrange_in_uint8(model) -> list[str]:
    """Move QuantizeLinear before, and DequantizeLinear after, the pure rearrangements next to them.

    The quantiser leaves the pixel path's padding, SpaceToDepth, DepthToSpace and crop in float32
    between a DequantizeLinear and a QuantizeLinear (they are not in its registry). Each commutes exactly
    with a per-tensor (scale, zero point) quantisation, so run on the uint8 tensor instead it gives the
    same numbers while moving a quarter of the bytes: these full-size rearrangements are a large share
    of an INT8 frame once the convs are integer. Returns the op types moved, input side first.
    """
    import onnx

    nodes = model.graph.node
    outputs = {o.name for o in model.graph.output}
    inits = {i.name: i for i in model.graph.initializer}

    def per_tensor(q) -> bool:
        scale = inits.get(q.input[1])
        return scale is not None and int(np.prod(scale.dims)) == 1

    def consumers(name: str) -> list:
        return [n for n in nodes if name in n.input]

    moved: list[str] = []
    changed = True
    while changed:
        changed = False
        producer = {out: n for n in nodes for out in n.output}
        for qdq in list(nodes):
            if qdq.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            op = producer.get(qdq.input[0])
            if qdq.op_type == "QuantizeLinear" and op is not None and _rearranges(op) and per_tensor(qdq):
                # x -> op -> Q  becomes  x -> Q -> op
                if consumers(op.output[0]) != [qdq] or op.output[0] in outputs:
                    continue
                quantized = f"{op.input[0]}_quantized_{len(moved)}"
                nodes.insert(
                    list(nodes).index(op),
                    onnx.helper.make_node(
                        "QuantizeLinear", [op.input[0], *qdq.input[1:]], [quantized], name=f"{qdq.name}_moved"
                    ),
                )
                op.input[0], op.output[0] = quantized, qdq.output[0]
                nodes.remove(qdq)
                moved.append(op.op_type)
                changed = True
                break
            if qdq.op_type == "DequantizeLinear" and per_tensor(qdq):
                users = consumers(qdq.output[0])
                if len(users) != 1 or not _rearranges(users[0]) or users[0].input[0] != qdq.output[0]:
                    continue
                # Q -> DQ -> op  becomes  Q -> op -> DQ
                op = users[0]
                if qdq.output[0] in outputs:
                    continue
                result = op.output[0]
                op.input[0], op.output[0] = qdq.input[0], f"{result}_quantized_{len(moved)}"
                qdq.input[0], qdq.output[0] = op.output[0], result
                nodes.remove(qdq)
                nodes.insert(list(nodes).index(op) + 1, qdq)
                moved.append(op.op_type)
                changed = True
                break
    return sorted(moved, key=["Pad", "SpaceToDepth", "DepthToSpace", "Slice"].index)


def _replace_initializer(model, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    (init,) = [i for i in model.graph.initializer if i.name == name]
    init.CopyFrom(numpy_helper.from_array(value, name))


def residual_on_lr_grid(model) -> bool:
    """Move the global residual before the DepthToSpace: DepthToSpace(y) + x becomes DepthToSpace(y + x'),
    x' the head's SpaceToDepth of the (padded) input. The same numbers in float: the tail conv's output
    channels are permuted from the exported DepthToSpace order (CRD: c*s*s + i*s + j) to SpaceToDepth's
    (DCR: (i*s + j)*3 + c), and the DepthToSpace becomes DCR. In INT8 the sum is then one QLinearAdd of
    two uint8 tensors on the low-resolution grid. Needs `space_to_depth_head` first; returns whether the
    pattern was found (the model is changed in place)."""
    from onnx import numpy_helper

    graph = model.graph
    x, y = graph.input[0].name, graph.output[0].name
    inits = {i.name: i for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    d2s = [n for n in graph.node if n.op_type == "DepthToSpace" and _mode(n) == "CRD"]
    s2d = [n for n in graph.node if n.op_type == "SpaceToDepth"]
    add = producer.get(y)
    if len(d2s) != 1 or len(s2d) != 1 or add is None or add.op_type != "Add" or x not in add.input:
        return False
    (d2s,), (s2d,) = d2s, s2d
    tail = producer.get(d2s.input[0])
    s = _attrs(d2s)["blocksize"]
    if tail is None or tail.op_type != "Conv" or len(tail.input) != 3 or _attrs(s2d)["blocksize"] != s:
        return False
    weight, bias = (numpy_helper.to_array(inits[name]) for name in tail.input[1:])
    if weight.shape[0] != 3 * s * s:
        return False
    # out channel c*s*s + k  ->  k*3 + c  (k = i*s + j)
    order = np.arange(3 * s * s).reshape(3, s * s).T.reshape(-1)
    _replace_initializer(model, tail.input[1], np.ascontiguousarray(weight[order]))
    _replace_initializer(model, tail.input[2], np.ascontiguousarray(bias[order]))
    for attr in d2s.attribute:
        if attr.name == "mode":
            attr.s = b"DCR"
    import onnx

    summed = f"{d2s.input[0]}_plus_input"
    graph.node.insert(
        list(graph.node).index(d2s),
        onnx.helper.make_node("Add", [d2s.input[0], s2d.output[0]], [summed], name="residual_on_lr_grid"),
    )
    d2s.input[0] = summed
    cropped = next(i for i in add.input if i != x)
    producer[cropped].output[0] = y
    graph.node.remove(add)
    return True


def _mode(node) -> str:
    mode = _attrs(node).get("mode", b"DCR")
    return mode.decode() if isinstance(mode, bytes) else mode


def uint8_image_io(model) -> None:
    """Make the quantised graph take and give the 8-bit image itself: the input's QuantizeLinear and the
    output's DequantizeLinear are dropped, and both grids set to the image's (scale 1/255, zero point 0;
    the output's is then exactly the rounding and clipping of saving an image). After `rearrange_in_uint8`,
    which leaves them at the graph's two ends."""
    import onnx

    graph = model.graph
    x, y = graph.input[0].name, graph.output[0].name
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == x]
    dequant = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == y]
    # Besides its QuantizeLinear only Shape ops (the padding's size) may read the float input.
    readers = [n for n in graph.node if x in n.input and n.op_type not in ("QuantizeLinear", "Shape")]
    if len(quant) != 1 or len(dequant) != 1 or readers:
        raise ValueError(
            "uint8 image I/O: the quantised graph's input or output is not a lone (De)QuantizeLinear"
        )
    (quant,), (dequant,) = quant, dequant
    for node in (quant, dequant):
        _replace_initializer(model, node.input[1], np.array(1 / 255, np.float32))
        _replace_initializer(model, node.input[2], np.array(0, np.uint8))
    for node in graph.node:
        node.input[:] = [x if name == quant.output[0] else name for name in node.input]
    producer = {out: n for n in graph.node for out in n.output}
    producer[dequant.input[0]].output[:] = [y]
    graph.node.remove(quant)
    graph.node.remove(dequant)
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.elem_type = onnx.TensorProto.UINT8


IMAGE_IO = ("uint8", "float32")


def quantize_student(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calibration: Sequence[np.ndarray],
    per_channel: bool = True,
    *,
    method: str = "minmax",
    image_io: str = "uint8",
    reduce_range: bool = True,
) -> dict:
    """Write an INT8 (QDQ) copy of the float32 student `fp32_onnx` to `out_path`, calibrated on `calibration`.

    `calibration`: arrays (N,3,H,W) float32 in [0,1], degraded inputs like the ones the model will see;
    crops (64 to 256 px) are enough: calibration keeps every batch's activations in memory until the end.
    `image_io`: uint8 (the image in and out as 0-255 bytes; see the module's notes) or float32.
    `reduce_range`: weights in [-64, 64] (7 bits), right on CPUs without VNNI too (module notes).
    Returns what was done.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if image_io not in IMAGE_IO:
        raise ValueError(f"image_io must be one of {IMAGE_IO}, got {image_io!r}")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    model = _load_onnx(fp32_onnx)
    arrays = _check_calibration(fp32_onnx, calibration)
    metadata = {e.key: e.value for e in model.metadata_props}
    head_regrouped = space_to_depth_head(model)
    uint8_io = image_io == "uint8" and head_regrouped and residual_on_lr_grid(model)
    if image_io == "uint8" and not uint8_io:
        raise UserError(
            f"{fp32_onnx}: uint8 image I/O needs a sharpkd student's head and residual; none found"
        )
    # With uint8 I/O the residual Add is integer too (its output grid is set by uint8_image_io).
    op_types = [*OP_TYPES_TO_QUANTIZE, *(["Add"] if uint8_io else [])]
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]

    import onnx

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs "please consider pre-processing" on the root logger
    try:
        # Percentile/entropy calibration print progress to stdout.
        with atomic_path(out_path) as tmp, contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                model,
                tmp,
                _calibration_reader(model.graph.input[0].name, arrays),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
                calibrate_method=calibrate_method,
                # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the batches it should merge.
            )
            quantized = onnx.load(str(tmp))
            uint8_ops = rearrange_in_uint8(quantized)
            if uint8_io:
                uint8_image_io(quantized)
            ops = integer_ops(quantized)
            if not ops.get("Conv"):  # raised inside the block: nothing is written
                raise UserError(f"{fp32_onnx}: quantisation left no Conv in int8; is it a sharpkd student?")
            # The quantiser drops the model's metadata (the runtime reads the student's scale from it).
            del quantized.metadata_props[:]
            if uint8_io:
                metadata["sharpkd.io"] = (
                    "(N,3,H,W) RGB uint8 (0-255), any H and W; output same shape and type"
                )
            for key, value in {**metadata, "sharpkd.precision": "int8"}.items():
                quantized.metadata_props.add(key=key, value=value)
            onnx.save(quantized, str(tmp))
    except UserError:
        raise
    except Exception as exc:  # the quantiser or its calibration session failed: say on which file
        raise UserError(f"{fp32_onnx}: INT8 quantisation failed ({type(exc).__name__}: {exc})") from None
    finally:
        root.setLevel(level)

    return {
        "source": str(fp32_onnx),
        "output": str(out_path),
        "format": "QDQ",
        "weights": ("int8 per channel" if per_channel else "int8 per tensor")
        + (", 7-bit" if reduce_range else ""),
        "activations": "uint8 asymmetric",
        "method": method,
        "calibration_batches": len(arrays),
        "calibration_images": int(sum(a.shape[0] for a in arrays)),
        "op_types_to_quantize": op_types,
        "quantized_ops": ops,
        "head": "SpaceToDepth + 3x3 conv" if head_regrouped else "as exported",
        "uint8_rearrangements": uint8_ops,
        "image_io": image_io,
    }


# ---------------------------------------------------------------- the export stage's INT8 model


def calibration_crops(pairs_dir: Path, patch_size: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` seeded training-input crops (1,3,P,P), what the INT8 ranges are calibrated on."""
    draw = TrainPatches(pairs_dir, keys=("input",), patch_size=patch_size).batch_fn(count, seed)
    return [c[None].numpy() for c in draw(0)["input"]]


def int8_cost(
    fp32_path: Path, int8_path: Path, sets: dict[str, list[EvalImage]], scale: int, tile: int, overlap: int
) -> dict:
    """PSNR / SSIM of the float32 and INT8 files on every set, scored by the evaluate stage's loop
    (evaluation.score_set, same tiling), and what INT8 costs: `int8.<set>.<metric>_{fp32,int8,cost}`."""
    metrics = QualityMetrics(scale, lpips=False)
    scores = {}
    for precision, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = as_torch(load_model(path, "cpu", torch.get_num_threads()).run)
        methods = {precision: model_method(session, tile, overlap, align=scale)}
        for name, images in sets.items():
            res = score_set(name, images, methods, metrics, SetResult(name), desc=f"INT8 check, {precision}:")
            scores[name, precision] = method_means(res, precision)
        del session, methods  # one live session at a time (see export.measure_speed)
    out: dict = {}
    for name in sets:
        for k in ("psnr", "ssim"):
            fp32, int8 = scores[name, "fp32"].get(k), scores[name, "int8"].get(k)
            out[f"int8.{name}.{k}_fp32"], out[f"int8.{name}.{k}_int8"] = fp32, int8
            out[f"int8.{name}.{k}_cost"] = None if fp32 is None or int8 is None else round(fp32 - int8, 5)
    return out


def export_int8(params: Params, pairs_dir: Path, fp32_path: Path, int8_path: Path) -> dict:
    """student_int8.onnx calibrated on training-input crops, and what it costs against the float32 model
    on the validation split and every eval.sets entry (evaluation.eval_sets: the images evaluate scores)."""
    scale = params.data.scale
    crops = calibration_crops(pairs_dir, params.data.patch_size, params.export.int8_calibration, params.seed)
    info = quantize_student(fp32_path, int8_path, crops)
    out: dict = {
        "int8.calibration_images": info["calibration_images"],
        "int8.method": info["method"],
        "int8.weights": info["weights"],
        "int8.quantized_ops": json.dumps(info["quantized_ops"]),
        "int8.head": info["head"],
        "int8.image_io": info["image_io"],
        "int8.uint8_rearrangements": json.dumps(info["uint8_rearrangements"]),
    }
    sets = {res.name: list(images) for res, images in eval_sets(params, pairs_dir, None, min_side(scale))}
    out |= int8_cost(fp32_path, int8_path, sets, scale, params.infer.tile, params.infer.overlap)
    print(
        "[export] INT8: "
        + ", ".join(f"{n} {out[f'int8.{n}.psnr_cost']} dB PSNR below float32" for n in sets)
        + f" ({info['quantized_ops']} quantised)"
    )
    return out
