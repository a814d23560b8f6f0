"""sharpkd.deploy.timing (and sharpkd.torch_timing): the one timing path (sizes, keys, targets) every speed figure goes through."""

from __future__ import annotations

import time

import pytest
import torch

from sharpkd import torch_timing
from sharpkd.deploy import timing
from sharpkd.deploy.timing import FRAME_1080P, SIZES, Target, figure_name, speed_figures, speed_key


def test_sizes_are_height_width():
    assert FRAME_1080P == (1080, 1920) and SIZES["1080p"] is FRAME_1080P
    assert SIZES["720p"] == (720, 1280) and SIZES["4k"] == (2160, 3840)
    assert timing.size_label((1080, 1920)) == "1080p" and timing.size_label((2160, 3840)) == "4k"
    assert timing.size_label((48, 64)) == "64x48"  # written WxH, as on a command line
    assert timing.frame((5, 7)).shape == (1, 3, 5, 7)


def test_one_key_scheme():
    assert figure_name("student", "torch", "cpu") == "student.torch_cpu"
    assert figure_name("student", "onnxruntime", "cpu", "int8") == "student.onnxruntime_cpu_int8"
    assert figure_name("bicubic", "resize", "cpu") == "bicubic.resize_cpu"
    assert speed_key("student.torch_cpu") == "speed.student.torch_cpu.1080p.ms"
    assert speed_key("student.torch_cpu", (48, 64), "fps") == speed_key("student.torch_cpu", "64x48", "fps")
    assert speed_figures("teacher.torch_cpu", FRAME_1080P, 250.0) == {
        "speed.teacher.torch_cpu.1080p.ms": 250.0,
        "speed.teacher.torch_cpu.1080p.fps": 4.0,
    }
    assert speed_figures("student.onnxruntime_cuda", "1080p", None, "no CUDA") == {
        "speed.student.onnxruntime_cuda.1080p.ms": None,
        "speed.student.onnxruntime_cuda.1080p.fps": None,
        "speed.student.onnxruntime_cuda.1080p.reason": "no CUDA",
    }


def test_time_ms_is_the_median_after_warmup():
    calls = []
    delays = iter([0.0, 0.03, 0.001, 0.002])  # the first (warm-up) call is not timed

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    ms = timing.time_ms(fn, repeats=3)
    assert len(calls) == 4 and 1.5 < ms < 20


def test_targets_are_built_one_at_a_time_and_released():
    """What a target builds (an ONNX Runtime session, say) lives only while that target is timed."""
    alive: list[str] = []
    log: list[tuple[str, int]] = []

    class Session:
        def __init__(self, name):
            self.name = name
            alive.append(name)

        def __del__(self):
            alive.remove(self.name)

    def target(name):
        def make(x):
            session = Session(name)
            return lambda: log.append((session.name, len(alive)))

        return Target("student", name, "cpu", "fp32", make)

    figures = timing.measure([target("a"), target("b")], repeats=2, size=(8, 8))
    assert set(log) == {("a", 1), ("b", 1)} and alive == []
    assert set(figures) == {f"speed.student.{n}_cpu.8x8.{f}" for n in "ab" for f in ("ms", "fps")}


def test_torch_and_tiled_targets_return_frames_to_the_host():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    t = torch_timing.torch_target("student", "torch", conv, "cpu")
    assert t.name == "student.torch_cpu" and t.warmup == 1
    with torch.no_grad():
        out = t.make(timing.frame((8, 10)))()
    assert out.shape == (1, 3, 8, 10) and out.device.type == "cpu" and out.dtype == torch.float32
    up = torch.nn.Upsample(scale_factor=2)
    t = torch_timing.tiled_target("teacher", up, 2, "cpu", tile=4, overlap=1, how="tiled 4")
    assert t.warmup == 0  # warmed up on one tile when built
    assert t.make(timing.frame((8, 12)))().shape == (1, 3, 8, 12)
    assert timing.time_target(t, timing.frame((8, 12)), 1) > 0


def test_timing_context_says_where():
    ctx = torch_timing.timing_context(3)
    assert ctx["timing.device"].startswith("cpu: ") and ctx["timing.repeats"] == 3
    assert ctx["timing.torch_threads"] == torch.get_num_threads()


@pytest.mark.parametrize("path", ["s.onnx", "s.pt", "s.pth"])
def test_model_kind_is_the_one_suffix_dispatch(tmp_path, path):
    from sharpkd.deploy.models import model_kind
    from sharpkd.errors import UserError

    (tmp_path / path).write_bytes(b"")
    assert model_kind(tmp_path / path) == (
        tmp_path / path,
        {"onnx": "onnx", "pt": "torchscript", "pth": "checkpoint"}[path[2:]],
    )
    (tmp_path / "s.bin").write_bytes(b"")
    with pytest.raises(UserError, match="unknown model type '.bin'"):
        model_kind(tmp_path / "s.bin")
    with pytest.raises(UserError, match="model not found"):
        model_kind(tmp_path / "none.onnx")
