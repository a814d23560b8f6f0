"""INT8 static quantisation of an exported student with ONNX Runtime (QDQ format).

What is quantised, and why (measured on Student(scale=4, channels=32, blocks=4), 1080p, 2 threads):
only the convs and the ReLUs between them. ONNX Runtime's CPU provider fuses each
DequantizeLinear -> Conv (-> Relu) -> QuantizeLinear into one QLinearConv (uint8 x int8,
channels-last), which is where the time goes. The pixel path (input, replicate pad, pixel
(un)shuffle, the global residual Add, the output) stays float32: quantising it too is no
faster and rounds the output image to a calibrated 8-bit grid (about 5 dB further from
float32). Weights are int8 per output channel, activations uint8 asymmetric (ReLU outputs
are non-negative; symmetric activations would waste half the range and keep the ReLUs).
Calibration is MinMax by default: percentile and entropy measured no better, and clipping
rare large residuals would clip the sharpening at strong edges, where it matters.

`quant_pre_process` is not used: its symbolic shape inference cannot follow the student's
size-dependent padding, and without it the pre-processing changed neither speed nor quality.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sharpkd.errors import UserError
from sharpkd.files import atomic_path

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


def quantize_student(
    fp32_onnx: str | Path,
    out_path: str | Path,
    calibration: Sequence[np.ndarray],
    per_channel: bool = True,
    *,
    method: str = "minmax",
) -> dict:
    """Write an INT8 (QDQ) copy of the float32 student `fp32_onnx` to `out_path`, calibrated on `calibration`.

    `calibration`: arrays (N,3,H,W) float32 in [0,1], degraded inputs like the ones the model will see;
    crops (64 to 256 px) are enough: calibration keeps every batch's activations in memory until the end.
    Returns what was done.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    model = _load_onnx(fp32_onnx)
    arrays = _check_calibration(fp32_onnx, calibration)
    metadata = {e.key: e.value for e in model.metadata_props}
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
                op_types_to_quantize=list(OP_TYPES_TO_QUANTIZE),
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method,
                # Not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the batches it should merge.
            )
            quantized = onnx.load(str(tmp))
            ops = integer_ops(quantized)
            if not ops.get("Conv"):  # raised inside the block: nothing is written
                raise UserError(f"{fp32_onnx}: quantisation left no Conv in int8; is it a sharpkd student?")
            # The quantiser drops the model's metadata (the runtime reads the student's scale from it).
            del quantized.metadata_props[:]
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
        "weights": "int8 per channel" if per_channel else "int8 per tensor",
        "activations": "uint8 asymmetric",
        "method": method,
        "calibration_batches": len(arrays),
        "calibration_images": int(sum(a.shape[0] for a in arrays)),
        "op_types_to_quantize": list(OP_TYPES_TO_QUANTIZE),
        "quantized_ops": ops,
    }
