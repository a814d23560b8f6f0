"""`sharpkd bench --video`: a clip sharpened end to end (decode, sharpen, encode, mux: what `sharpkd sharpen
clip.mp4` runs) beside the model alone, measured in the same run."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
from PIL import Image

from sharpkd.deploy.bench import environment, parse_sizes, set_torch_threads, time_row, torch_devices
from sharpkd.deploy.encoding import NVENC, VideoOptions, check_options, encoder_available
from sharpkd.deploy.frames import sharpen_frames
from sharpkd.deploy.models import load_model, model_kind, resolve_model
from sharpkd.deploy.pixels import to_uint
from sharpkd.deploy.sessions import ort_cuda_available
from sharpkd.deploy.timing import Target, frame, onnx_target
from sharpkd.deploy.transcode import sharing_the_cpu, sharpen_video
from sharpkd.errors import UserError

VIDEO_SIZES = "1080p"
VIDEO_FRAMES = 150  # 5 s at 30 fps: the start (opening, the first frame) and the encoder's flush count little


def bench_clip(path: Path, size: tuple[int, int], frames: int, fps: int = 30) -> Path:
    """A clip of (height, width) standing for camera footage: a slow pan across a photo with a little grain,
    H.264 4:2:0, crf 18 (a flat or pure-noise clip would decode and encode unusually fast or slow)."""
    h, w = size
    big_w, big_h = w + max(w // 4, 2 * frames), h + max(h // 4, frames)
    photo = np.asarray(Image.fromarray(_photo()).resize((big_w, big_h), Image.BICUBIC), dtype=np.int16)
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i in range(frames):
            x, y = i * (big_w - w) // frames, i * (big_h - h) // frames
            grain = rng.integers(-3, 4, (h, w, 1), dtype=np.int16)
            rgb = np.clip(photo[y : y + h, x : x + w] + grain, 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def _photo() -> np.ndarray:
    """scikit-image's coffee where it is installed (the pipeline's install), else a drawn scene of edges,
    gradients and texture of the same size."""
    try:
        from skimage import data

        return data.coffee()
    except ImportError:
        yy, xx = np.mgrid[0:400, 0:600].astype(np.float32)
        rings = 0.5 + 0.5 * np.sin(np.hypot(yy - 180, xx - 260) / 9.0)
        bars = (xx // 40 + yy // 60) % 2
        rgb = np.stack([rings * 200 + 30, bars * 120 + xx / 6, yy / 2 + rings * 60], axis=2)
        return np.clip(rgb, 0, 255).astype(np.uint8)


def _video_model(model_path: str | Path | None) -> Path:
    """The model the video rows time: the given one, else the checkout's export (models.resolve_model)."""
    return resolve_model(model_path)[0]


def _video_devices(path: Path) -> list[str]:
    """Where the model can run: the CPU, and CUDA when its runtime (ONNX Runtime or torch) has it."""
    _, kind = model_kind(path)
    if kind != "onnx":
        return torch_devices()
    return ["cpu"] + (["cuda"] if ort_cuda_available() else [])


def _alone_target(path: Path, device: str, threads: int) -> Target:
    """The model alone, frame in, frame out (timing.py): what the end-to-end row is set against."""
    _, kind = model_kind(path)
    if kind == "onnx":
        return onnx_target(path, device, threads)
    from sharpkd.torch_timing import torch_target

    runtime = "torch" if kind == "checkpoint" else "torchscript"
    return torch_target("student", runtime, load_model(path, device).run.module, device)


def _video_target(path: Path, device: str, precision: str, clip: Path, opts, reports: list) -> Target:
    """`sharpkd sharpen clip.mp4` end to end (decode, sharpen, encode, mux; video.sharpen_video) as a timing
    target: one call runs the whole clip, its report appended to `reports`. The model is loaded, and run
    once on a frame, before the timing."""

    def make(x: np.ndarray):
        model = sharing_the_cpu(load_model(path, device))  # what sharpen_video runs, made and warmed here
        rgb = to_uint(x)
        sharpen_frames(model, rgb, max(rgb.shape[-2:]), 0)  # warm-up: ONNX Runtime's first run allocates
        out = clip.with_name(f"{clip.stem}_sharp_{device}.mp4")
        return lambda: reports.append(_expect_all(sharpen_video(model, clip, out, opts=opts), clip))

    how = f"end to end: decode, sharpen, {opts.describe()}"
    return Target("student", "video", device, precision, make, how, warmup=0)


def _expect_all(report, clip: Path):
    if report.damaged:
        raise RuntimeError(f"{clip.name}: {report.problem()}")
    return report


def _video_rows(
    path: Path, label: str, size: tuple[int, int], frames: int, clip: Path, threads: int, repeats: int, opts
) -> list:
    """Per device, two bench rows: the model alone and the clip end to end (one run). The model alone is the
    faster of two medians of `repeats`, one just before the clip and one just after, so that a moment of
    load elsewhere on the machine cannot flatter the ratio."""
    rows = []
    x = frame(size)
    for device in _video_devices(path):
        alone = _alone_target(path, device, threads)
        before = time_row(alone, x, label, repeats)
        dev_opts = replace(opts, codec=NVENC) if device == "cuda" and encoder_available(NVENC) else opts
        reports: list = []
        target = _video_target(path, device, alone.precision, clip, dev_opts.on(device), reports)
        video = time_row(target, x, label, 1, per_call=frames) | {"frames": frames}
        if reports:
            video["stages_ms"] = {k: round(v, 2) for k, v in reports[-1].stage_ms().items()}
        after = time_row(alone, x, label, repeats)
        rows += [min(before, after, key=lambda r: r["ms"] or float("inf")), video]
    return rows


def video_summary(rows: list[dict]) -> list[dict]:
    """Per device and size: end-to-end frames/s against the model alone's, measured in the same run."""
    alone = {(r["device"], r["size"]): r for r in rows if r["runtime"] != "video"}
    out = []
    for r in rows:
        a = alone.get((r["device"], r["size"]))
        if r["runtime"] != "video" or a is None:
            continue
        ratio = round(r["fps"] / a["fps"], 3) if r["fps"] and a["fps"] else None
        out.append(
            {"device": r["device"], "size": r["size"], "end_to_end_fps": r["fps"], "model_fps": a["fps"],
             "ratio": ratio, "how": r["how"], "model": f"{a['runtime']} {a['precision']}",
             "stages_ms": r.get("stages_ms", {})}
        )  # fmt: skip
    return out


def run_video_bench(model_path: str | Path | None = None, sizes: str = VIDEO_SIZES, frames: int = VIDEO_FRAMES,
                    repeats: int = 5, threads: int = 0, opts=None, progress=None) -> dict:  # fmt: skip
    """`sharpkd bench --video`: a clip (bench_clip) sharpened end to end, and the model alone, at each size and
    on each device; the same result shape as run_bench, plus "video": the end-to-end / model-alone ratios."""
    opts = opts or VideoOptions()
    check_options(opts)
    if frames < 2:
        raise UserError(f"--frames must be at least 2, got {frames}")
    set_torch_threads(threads)
    path = _video_model(model_path)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sharpkd-bench-video-") as tmp:
        for label, h, w in parse_sizes(sizes):
            if progress:
                progress(f"video {label}")
            clip = bench_clip(Path(tmp) / f"clip_{label}.mp4", (h, w), frames)
            rows += _video_rows(path, label, (h, w), frames, clip, threads, repeats, opts)
    return environment(rows, threads, repeats) | {
        "video": video_summary(rows),
        "notes": [
            f"video: {path}, {frames}-frame clip (a pan across a photo, H.264 4:2:0, 30 fps); "
            f"model alone: the faster of two medians of {repeats}, just before and just after the clip; "
            "end to end: one run of the clip"
        ],  # fmt: skip
    }


def video_lines(result: dict) -> list[str]:
    """The video rows' ratios, one line each, and under each where a frame's time went."""
    lines = []
    for v in result.get("video", []):
        lines.append(
            f"video {v['size']} on {v['device']}: end to end {v['end_to_end_fps']} frames/s = "
            f"{v['ratio']} of the model alone ({v['model']}, {v['model_fps']} frames/s); {v['how']}"
        )
        if v.get("stages_ms"):
            stages = ", ".join(f"{k} {ms:.1f}" for k, ms in v["stages_ms"].items())
            lines.append(f"  ms per frame: {stages} (CPU ms beside the model, each in its own thread)")
    return lines
