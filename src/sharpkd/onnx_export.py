"""Exporting the student: ONNX (float32 and float16) and TorchScript, parity against PyTorch, speed.
The export stage (stages/export.py) uses these; its INT8 model is quantize.export_int8, its model card
sharpkd.model_card, and every speed figure goes through sharpkd.deploy.timing.

Export path: `torch.onnx.export(..., dynamo=False)`, the TorchScript-based exporter. The
torch.export-based one (torch's default) needs the `onnxscript` package, which the
pipeline does not depend on, and the student's graph (convs, replicate padding computed
from the input size, pixel (un)shuffle) exports exactly with the classic exporter:
padding to a multiple of the scale stays symbolic, so odd sizes work (checked below).

float16 variant: exported from a `.half()` copy of the model, so its input and output
are float16 too (ONNX Runtime on a GPU runs it natively; `deploy.sessions.OnnxFunction` casts at
the boundary). onnxconverter-common's `convert_float_to_float16` would keep float32 I/O,
but it is not a dependency and the half export needs nothing extra.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sharpkd import __version__
from sharpkd.deploy.models import SCALE_KEY, load_model
from sharpkd.deploy.sessions import ort_cuda_available
from sharpkd.deploy.timing import (
    FRAME_1080P,
    Target,
    figure_name,
    measure,
    onnx_target,
    speed_figures,
    speed_key,
)
from sharpkd.errors import UserError
from sharpkd.models.student import Student
from sharpkd.tensors import as_torch
from sharpkd.torch_timing import timing_context, torch_target

# Odd sizes whose padding to a multiple of the scale differs (and a batch of 2).
PARITY_SHAPES = [(1, 3, 37, 53), (2, 3, 65, 31)]


class ExportGraph(nn.Module):
    """The student as it is exported to ONNX: the same arithmetic, cheaper operators.

    pixel_unshuffle by s followed by the head's 3x3 conv is one conv on the full-size image with a
    3s x 3s kernel, stride s and padding s (weight[o, c, dy*s+i, dx*s+j] = head[o, c*s*s+i*s+j, dy, dx]).
    ONNX Runtime then runs no 6-D transpose for the unshuffle (about 15% of a 1080p frame on a CPU,
    more under INT8, where the convs get faster and the transpose does not).
    """

    def __init__(self, student: Student):
        super().__init__()
        student = student.deploy()
        s, head = student.scale, student.head[0]
        c_out = head.weight.shape[0]
        weight = head.weight.detach().reshape(c_out, 3, s, s, 3, 3).permute(0, 1, 4, 2, 5, 3)
        self.head = nn.Conv2d(3, c_out, 3 * s, stride=s, padding=s)
        with torch.no_grad():
            self.head.weight.copy_(weight.reshape(c_out, 3, 3 * s, 3 * s))
            self.head.bias.copy_(head.bias.detach())
        self.act, self.body, self.tail, self.scale = student.head[1], student.body, student.tail, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        h, w = x.shape[-2], x.shape[-1]
        xp = F.pad(x, (0, (s - w % s) % s, 0, (s - h % s) % s), mode="replicate")
        # Cropped before the residual Add, which then takes the unpadded input: the padded copy
        # feeds only the head, so INT8 can pad the quantised input instead (quantize.py).
        return F.pixel_shuffle(self.tail(self.body(self.act(self.head(xp)))), s)[..., :h, :w] + x


def export_onnx(model: Student, path: str | Path, opset: int = 17, fp16: bool = False) -> Path:
    """Write `model` as ONNX with dynamic batch, height and width; the student's scale goes into the metadata."""
    import onnx

    path = Path(path)
    m = ExportGraph(copy.deepcopy(model).cpu().eval()).eval()
    dtype = torch.float16 if fp16 else torch.float32
    m = m.to(dtype)
    # An odd dummy size, so the traced padding is the general case, not a no-op.
    dummy = torch.rand(1, 3, 67, 45, dtype=dtype)
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            # The classic exporter warns that it is deprecated and that shapes are traced.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                m,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": axes, "output": axes},
                do_constant_folding=True,
            )
    except Exception as exc:  # an unsupported opset or operator: say which, without a traceback
        raise UserError(
            f"{path}: ONNX export failed at opset {opset} ({type(exc).__name__}: {exc})"
        ) from None
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {
        SCALE_KEY: str(model.scale),
        "sharpkd.arch": json.dumps(model.deploy().arch_kwargs()),
        "sharpkd.precision": "fp16" if fp16 else "fp32",
        "sharpkd.version": __version__,
        "sharpkd.io": "(N,3,H,W) RGB in [0,1], any H and W; output same shape",
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path


def export_torchscript(model: Student, path: str | Path) -> Path:
    """Scripted (not traced), so the size-dependent padding stays code, not constants."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch, still works
        scripted = torch.jit.script(copy.deepcopy(model.deploy()).cpu().eval())
        scripted.save(str(path))
    return path


def _load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def parity_inputs(valid_dir: str | Path) -> tuple[list[tuple[str, torch.Tensor]], str | None]:
    """The first validation input image (whole) and random tensors of odd sizes; a note when no image is found."""
    from sharpkd.deploy.images import list_images, read_rgb
    from sharpkd.tensors import to_tensor

    gen = torch.Generator().manual_seed(0)
    inputs = [(f"random {'x'.join(map(str, s))}", torch.rand(*s, generator=gen)) for s in PARITY_SHAPES]
    valid = Path(valid_dir)
    images = list_images(valid) if valid.is_dir() else []
    if not images:
        return inputs, f"no validation image under {valid}; parity on random tensors only"
    rgb, _ = read_rgb(images[0])
    return [(images[0].name, to_tensor(rgb))] + inputs, None


@torch.no_grad()
def check_parity(model: Student, inputs, onnx_path: Path, ts_path: Path, fp16_path: Path | None) -> dict:
    """Max abs difference against the PyTorch model, over all inputs, for each exported file (CPU)."""
    runners = {
        "onnx_fp32": lambda: as_torch(load_model(onnx_path).run),
        "torchscript": lambda: _load_torchscript(ts_path),
    }
    if fp16_path is not None:
        runners["onnx_fp16"] = lambda: as_torch(load_model(fp16_path).run)
    model = model.cpu().eval()
    refs = [model(x) for _, x in inputs]
    out: dict = {}
    for name, make in runners.items():
        try:
            fn = make()
            worst = max(
                float((fn(x).float() - ref).abs().max()) for (_, x), ref in zip(inputs, refs, strict=True)
            )
            out[f"parity.{name}.max_abs"] = worst
        except Exception as exc:  # float16 kernels may be missing on some CPU builds of ORT: record why
            if name != "onnx_fp16":
                raise
            out[f"parity.{name}.max_abs"] = None
            out[f"parity.{name}.reason"] = (
                f"ONNX Runtime CPU could not run it: {str(exc).splitlines()[0][:200]}"
            )
    if fp16_path is None:
        out["parity.onnx_fp16.max_abs"] = None
        out["parity.onnx_fp16.reason"] = "export.fp16 is false"
    return out


def _speed_targets(
    model: Student, onnx_path: Path, ts_path: Path, fp16_path: Path | None, int8_path: Path | None
) -> tuple[list[Target], dict[str, str]]:
    """What export times (timing.Target), and the figures it cannot time with why."""
    threads = torch.get_num_threads()
    targets = [
        torch_target("student", "torch", model, "cpu"),
        torch_target("student", "torchscript", _load_torchscript(ts_path), "cpu"),
        onnx_target(onnx_path, "cpu", threads),
    ]
    missing = {}
    if int8_path is not None:
        targets.append(onnx_target(int8_path, "cpu", threads))
    else:
        missing[figure_name("student", "onnxruntime", "cpu", "int8")] = "export.int8 is false"
    cuda, cuda_fp16 = (figure_name("student", "onnxruntime", "cuda", p) for p in ("fp32", "fp16"))
    if not ort_cuda_available():
        missing[cuda] = missing[cuda_fp16] = "no CUDA execution provider in this ONNX Runtime"
        return targets, missing
    targets.append(onnx_target(onnx_path, "cuda", threads))
    if fp16_path is not None:
        targets.append(onnx_target(fp16_path, "cuda", threads))
    else:
        missing[cuda_fp16] = "export.fp16 is false"
    return targets, missing


def measure_speed(
    model: Student,
    onnx_path: Path,
    ts_path: Path,
    fp16_path: Path | None,
    repeats: int,
    int8_path: Path | None = None,
) -> dict:
    """ms and fps on one 1080p frame (timing.measure): torch eager (reference), TorchScript and ONNX Runtime
    on the CPU (float32, and INT8 when given); CUDA EP when present. One session is alive at a time: an idle
    ONNX Runtime session's threads still spin and would slow the one being timed."""
    targets, missing = _speed_targets(model, onnx_path, ts_path, fp16_path, int8_path)
    out = measure(targets, repeats)
    for name, why in missing.items():
        out |= speed_figures(name, FRAME_1080P, None, why)
    if int8_path is not None:
        fp32, int8 = (speed_key(figure_name("student", "onnxruntime", "cpu", p)) for p in ("fp32", "int8"))
        out["int8.speedup"] = round(out[fp32] / out[int8], 3)
    return out | timing_context(repeats, "cpu")
