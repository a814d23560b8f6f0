"""Video through PyAV (deploy/transcode.py): `sharpkd sharpen clip` keeps frames, size, timing, audio, subtitles,
rotation and colour tags; damaged frames are skipped and reported; the threads stop on any failure;
`sharpkd bench --video`. Every clip is made here with PyAV."""

from __future__ import annotations

import json
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import write_clip
from sharpkd.cli import app
from sharpkd.deploy import encoding as E
from sharpkd.deploy import frames as V
from sharpkd.deploy import transcode as T
from sharpkd.models.student import Student
from sharpkd.onnx_export import export_onnx
from sharpkd.tensors import to_image, to_tensor

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny x2 student with a non-zero residual (sharp.onnx), and one whose residual is zero (same.onnx:
    the identity, so an output frame can be set against its input frame)."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    student = Student(scale=2, channels=8, blocks=1).eval()
    torch.nn.init.normal_(student.tail.weight, std=0.1)
    export_onnx(student, folder / "sharp.onnx")
    same = Student(scale=2, channels=8, blocks=1).eval()
    torch.nn.init.zeros_(same.tail.weight)
    torch.nn.init.zeros_(same.tail.bias)
    export_onnx(same, folder / "same.onnx")
    return {"student": student, "sharp": folder / "sharp.onnx", "same": folder / "same.onnx"}


def frames(n: int, width: int, height: int, seed: int = 0):
    """A moving square over a gradient, with a little grain (compressible, different every frame)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    for i in range(n):
        img = np.broadcast_to(ramp, (height, width, 3)).copy()
        img[height // 4 : height // 2, width // 5 + 2 * i : width // 2 + 2 * i] = (230, 40, 40)
        yield np.clip(img + rng.integers(0, 12, img.shape), 0, 255).astype(np.uint8)


def sharpen(*args, model):
    return runner.invoke(app, ["sharpen", *map(str, args), "-m", str(model)], env={"COLUMNS": "200"})


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def packets(path, kind: str) -> list[tuple[bytes, float, float]]:
    """(bytes, pts in s, duration in s) of every packet of the first `kind` stream."""
    with av.open(str(path)) as c:
        s = getattr(c.streams, kind)[0]
        return [
            (bytes(p), float(p.pts * p.time_base), float(p.duration * p.time_base))
            for p in c.demux(s)
            if p.size
        ]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def test_odd_sized_clip_with_audio_keeps_frames_size_rate_and_audio_packets(tmp_path, models):
    clip = write_clip(tmp_path / "odd.mp4", frames(30, 321, 241), fps=30, audio=True)
    res = sharpen(clip, model=models["sharp"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "odd_sharp.mp4"
    assert (
        "30 frames, 321x241 at 30 fps, libx264 yuv444p" in res.output
        and "1 audio stream(s) copied" in res.output
    )
    assert "videos: whole frames up to 4K, libx264 preset ultrafast crf 18" in res.output  # the CPU's preset
    with av.open(str(clip)) as a, av.open(str(out)) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert vb.codec_context.name == "h264" and vb.codec_context.pix_fmt == "yuv444p"
        assert (vb.width, vb.height) == (321, 241) and vb.average_rate == va.average_rate == 30
        assert vb.time_base == va.time_base
        assert [s.type for s in b.streams] == ["video", "audio"]
    got = decoded(out)
    assert len(got) == 30 and {g.shape for g in got} == {(241, 321, 3)}
    assert packets(out, "audio") == packets(clip, "audio") and len(packets(clip, "audio")) > 30


def test_frames_are_the_model_applied_and_the_preview_is_side_by_side(tmp_path, models):
    # An odd width: 4:4:4 in and out, so crf 0 leaves only the RGB <-> YUV rounding.
    clip = write_clip(tmp_path / "c.mp4", frames(6, 65, 48), fps=12)
    res = sharpen(clip, "--preview", "--crf", "0", model=models["sharp"])
    assert res.exit_code == 0, res.output
    inputs = decoded(clip)
    with torch.no_grad():
        want = [to_image(models["student"](to_tensor(x))) for x in inputs]
    got = decoded(tmp_path / "c_sharp.mp4")
    assert len(got) == 6 and min(psnr(g, w) for g, w in zip(got, want, strict=True)) > 40
    assert min(psnr(g, x) for g, x in zip(got, inputs, strict=True)) < 30  # the model changed them
    prev = decoded(tmp_path / "c_sharp_preview.mp4")
    assert len(prev) == 6 and prev[0].shape == (48, 130, 3)
    assert psnr(prev[0][:, :65], inputs[0]) > 40 and psnr(prev[0][:, 65:], want[0]) > 40


def _damage(path, packet_indices, seed=1):
    """Overwrite the bytes of these video packets (decode order) with noise, in place."""
    with av.open(str(path)) as c:
        where = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for k in packet_indices:
        pos, size = where[k]
        data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_damaged_frames_are_skipped_counted_and_reported(tmp_path, models):
    """OpenCV read such a 10-frame clip as its first frames only, and said nothing."""
    clip = write_clip(tmp_path / "d.mp4", frames(10, 64, 48), fps=10, audio=True)
    _damage(clip, [3, 4])
    res = sharpen(clip, model=models["sharp"])
    assert res.exit_code == 1
    assert "2 frame(s) could not be decoded (damaged?) and are missing" in res.stderr
    assert "d_sharp.mp4 holds the others" in res.stderr
    assert "d.mp4 -> " in res.output and "8 frames" in res.output
    assert "sharpened 1 file(s); 1 with frames lost to damage" in res.output
    assert len(decoded(tmp_path / "d_sharp.mp4")) == 8
    assert packets(tmp_path / "d_sharp.mp4", "audio") == packets(clip, "audio")


def _tagged_mkv(path, n=5):
    """An .mkv shown rotated 90 degrees, BT.709 full range, 1/1000 time base, irregular frame times, and
    a SubRip subtitle stream."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        cc = v.codec_context
        cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = 1, 1, 1, 2
        v.set_display_rotation(90)
        sub = out.add_mux_stream("subrip", time_base=Fraction(1, 1000))
        for i, rgb in enumerate(frames(n, 64, 48)):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=1, dst_color_range=2
            )
            f.pts, f.time_base = [0, 1, 3, 4, 7][i], Fraction(1, 10)
            out.mux(v.encode(f))
        out.mux(v.encode(None))
        for i, text in enumerate(["hello", "world"]):
            p = av.Packet(text.encode())
            p.stream, p.time_base, p.pts, p.dts, p.duration = sub, Fraction(1, 1000), i * 300, i * 300, 250
            out.mux(p)
    return path


def _frame_times(path):
    with av.open(str(path)) as c:
        return [round(float(f.time), 3) for f in c.decode(video=0)]


def test_rotation_colour_tags_timing_and_subtitles_are_kept(tmp_path, models):
    clip = _tagged_mkv(tmp_path / "t.mkv")
    res = sharpen(clip, model=models["same"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "t_sharp.mkv"  # an .mkv stays an .mkv
    assert "1 subtitle stream(s) copied" in res.output
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range) == (1, 1, 1, 2)
        assert c.streams.video[0].time_base == Fraction(1, 1000)
        assert next(c.decode(video=0)).rotation == 90
    assert _frame_times(out) == _frame_times(clip) == [0.0, 0.1, 0.3, 0.4, 0.7]
    assert packets(out, "subtitles") == packets(clip, "subtitles")
    # The identity model: what comes out is what went in, so both colour conversions used the same matrix.
    assert min(psnr(a, b) for a, b in zip(decoded(out), decoded(clip), strict=True)) > 35


def test_a_stream_the_output_cannot_hold_is_named(tmp_path, models):
    clip = _tagged_mkv(tmp_path / "t.mkv")
    res = sharpen(clip, "-o", tmp_path / "t.mp4", model=models["same"])
    assert res.exit_code == 0, res.output
    assert "subtitle stream #1 (subrip) not kept: .mp4 cannot hold it (.mkv can)" in res.output
    assert len(decoded(tmp_path / "t.mp4")) == 5


def test_outputs_keep_their_container_or_become_mp4(tmp_path, models):
    write_clip(tmp_path / "a.mov", frames(2, 32, 32))
    write_clip(tmp_path / "b.avi", frames(2, 32, 32))
    res = sharpen(tmp_path / "a.mov", tmp_path / "b.avi", model=models["same"])
    assert res.exit_code == 0, res.output
    assert len(decoded(tmp_path / "a_sharp.mov")) == 2 and len(decoded(tmp_path / "b_sharp.mp4")) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codec", "nope"], "--codec nope: this FFmpeg has no such encoder"),
        (["--codec", "aac"], "--codec aac: not a video encoder (audio)"),
        (["--codec", "mpeg4", "--crf", "20"], "--crf: no constant-quality option is known for mpeg4"),
        (["--preset", "bogus"], "--codec libx264: cannot be opened with libx264 preset bogus crf 18"),
    ],
)
def test_encoder_problems_are_one_line_before_any_work(tmp_path, models, args, message):
    clip = write_clip(tmp_path / "c.mp4", frames(2, 32, 32))
    res = sharpen(clip, *args, model=models["same"])
    assert res.exit_code == 1 and message in res.stderr, res.output
    assert "Traceback" not in res.output and sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]


def test_an_encoder_that_cannot_keep_an_odd_size_says_so(tmp_path, models):
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this FFmpeg has no libsvtav1")
    clip = write_clip(tmp_path / "c.mp4", frames(2, 33, 25))
    res = sharpen(clip, "--codec", "libsvtav1", model=models["same"])
    assert res.exit_code == 1 and "libsvtav1 cannot keep the size 33x25" in res.stderr, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]


def test_pixel_formats():
    x264, svt = av.Codec("libx264", "w"), av.Codec("libsvtav1", "w")
    fmt = av.VideoFormat
    assert E.pixel_format(x264, fmt("yuv420p"), 64, 48) == "yuv420p"
    assert E.pixel_format(x264, fmt("yuvj420p"), 64, 48) == "yuv420p"
    assert E.pixel_format(x264, fmt("yuv420p"), 65, 48) == "yuv444p"
    assert E.pixel_format(x264, fmt("yuv422p"), 64, 47) == "yuv422p"
    assert E.pixel_format(x264, fmt("yuv422p"), 63, 48) == "yuv444p"
    assert E.pixel_format(x264, fmt("gbrp"), 64, 48) == "yuv444p"
    assert E.pixel_format(svt, fmt("yuv444p"), 64, 48) == "yuv420p"  # it has no 4:4:4; the size still fits


def _threads_settle(before: int) -> bool:
    for _ in range(50):
        if threading.active_count() <= before:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["writer", "model"])
def test_a_failing_thread_stops_the_others_and_nothing_is_kept(tmp_path, models, monkeypatch, where):
    calls = {"n": 0}

    def fail_after_three(*args, real):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(*args)

    if where == "writer":
        real = T._Encoder.write
        monkeypatch.setattr(T._Encoder, "write", lambda self, *a: fail_after_three(self, *a, real=real))
    else:
        real = V.ModelIO.run
        monkeypatch.setattr(V.ModelIO, "run", lambda self, *a: fail_after_three(self, *a, real=real))
    clip = write_clip(tmp_path / "c.mp4", frames(40, 64, 48), audio=True)
    before = threading.active_count()
    res = sharpen(clip, model=models["same"])
    assert res.exit_code == 1 and "No space left on device" in res.stderr, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.mp4"]
    assert _threads_settle(before)


def test_frames_go_through_the_model_in_batches(tmp_path, models, monkeypatch):
    from sharpkd.deploy.models import load_model

    shapes = []
    real = V.ModelIO.run

    def record(self, batch):
        shapes.append((len(batch), *batch[0].shape))
        return real(self, batch)

    monkeypatch.setattr(V.ModelIO, "run", record)
    clip = write_clip(tmp_path / "c.mp4", frames(7, 32, 24), audio=True)
    report = T.sharpen_video(
        load_model(models["same"]), clip, tmp_path / "o.mp4", opts=T.VideoOptions(batch=3)
    )
    assert report.frames == 7 and not report.damaged
    assert [s[0] for s in shapes] == [3, 3, 1] and shapes[0][1:] == (3, 24, 32)
    assert len(decoded(tmp_path / "o.mp4")) == 7


def test_bench_video_times_the_clip_end_to_end_beside_the_model(tmp_path, models):
    out = tmp_path / "bench.json"
    res = runner.invoke(
        app,
        [
            "bench",
            "--video",
            "-m",
            str(models["sharp"]),
            "--sizes",
            "64x48",
            "--frames",
            "4",
            "--repeats",
            "1",
        ]
        + ["--json", str(out)],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 0, res.output
    assert "of the model alone" in res.output and "end to end" in res.output
    data = json.loads(out.read_text())
    figures = data["figures"]
    assert figures["speed.student.video_cpu.64x48.fps"] > 0
    assert figures["speed.student.onnxruntime_cpu.64x48.fps"] > 0
    (row,) = data["video"]
    assert row["size"] == "64x48" and row["device"] == "cpu" and 0 < row["ratio"]
    # Where the time went: each stage beside the model, and the model's own wall time.
    stages = row["stages_ms"]
    assert {"decode", "to RGB", "to YUV", "encode", "model (wall)"} <= set(stages)
    assert stages["model (wall)"] > 0 and all(
        v >= 0 for k, v in stages.items() if k != "model and the rest (CPU)"
    )
    assert "ms per frame: decode" in res.output


def test_an_int8_model_takes_the_frames_bytes_with_no_float_round_trip():
    """The INT8 zoo student gets uint8 planes and gives uint8 back: the same bytes as the float path
    (to_float -> the model -> to_uint), without its four passes over every frame."""
    from sharpkd.deploy.models import load_model
    from sharpkd.deploy.pixels import to_float, to_uint

    model = load_model("zoo:fast", "cpu")
    assert model.takes_bytes
    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 40, 56), dtype=np.uint8)
    io = V.ModelIO(model, 64, 0)
    assert io.prepare(rgb[0]).dtype == np.uint8
    assert V.ModelIO(model, 32, 0).prepare(rgb[0]).dtype == np.float32  # a frame in tiles: float
    want = to_uint(model.run(to_float(rgb)))
    assert np.array_equal(V.sharpen_frames(model, rgb, 64, 0), want)


def test_model_io_rounds_as_the_image_path_does():
    class Model:  # values outside [0, 1] and halves of a level, as a real residual gives
        on_cpu = True
        takes_bytes = False

        def apply(self, x, tile, overlap):
            return x * 1.37 - 0.2

    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 7), dtype=np.uint8)
    want = [to_image(to_tensor(f.transpose(1, 2, 0)) * 1.37 - 0.2).transpose(2, 0, 1) for f in rgb]
    assert np.array_equal(V.sharpen_frames(Model(), rgb, 16, 0), np.stack(want))


def test_ten_bit_input_says_it_is_written_as_eight_bit(tmp_path, models):
    clip = write_clip(tmp_path / "ten.mp4", frames(3, 32, 32), pix_fmt="yuv420p10le")
    res = sharpen(clip, model=models["same"])
    assert res.exit_code == 0, res.output
    assert "10-bit input written as 8-bit" in res.output and "libx264 yuv420p" in res.output


def test_sharpen_writes_the_containers_video_knows():
    from sharpkd.deploy.jobs import VIDEO_KEPT_SUFFIXES, VIDEO_SAVE_SUFFIXES, VIDEO_SUFFIXES

    assert (
        VIDEO_SAVE_SUFFIXES == set(E.CONTAINERS)
        and VIDEO_KEPT_SUFFIXES <= VIDEO_SAVE_SUFFIXES <= VIDEO_SUFFIXES
    )


def test_row07_a_download_cut_short_loses_the_frames_its_container_lists(tmp_path, models):
    """Issue 40 row 7: an MP4 with its index first (faststart) cut in half: the frames the container
    lists and the file no longer holds are lost frames, reported, exit 1 (were: a note, exit 0)."""
    clip = write_clip(tmp_path / "c.mp4", frames(30, 64, 48), options={"g": "1"})  # frames of like sizes
    first = tmp_path / "first.mp4"  # the same packets, the index moved to the front
    with av.open(str(clip)) as inp, av.open(str(first), "w", options={"movflags": "faststart"}) as out:
        vout = out.add_stream_from_template(inp.streams.video[0])
        for p in inp.demux(video=0):
            if p.dts is not None:
                p.stream = vout
                out.mux(p)
    data = first.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    res = sharpen(cut, model=models["same"])
    written = len(decoded(tmp_path / "cut_sharp.mp4"))
    assert res.exit_code == 1, res.output
    assert 0 < written < 30 and f"{30 - written} frame(s) could not be decoded" in res.stderr


def test_row16_a_stream_cut_before_its_first_keyframe_counts_the_frames_it_drops(tmp_path, models):
    """Issue 40 row 16: a transport stream that starts mid-GOP: the packets before the first keyframe
    decode to nothing; they are counted as lost, not dropped without a word."""
    ts = write_clip(tmp_path / "a.ts", frames(40, 64, 48), options={"g": "25", "bf": "0"})
    with av.open(str(ts)) as inp, av.open(str(tmp_path / "cut.ts"), "w", format="mpegts") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        for i, p in enumerate(p for p in inp.demux(vin) if p.size):
            if i >= 5:  # from the 6th frame: 20 before the next keyframe (frame 25)
                p.stream = vout
                out.mux(p)
    res = sharpen(tmp_path / "cut.ts", model=models["same"])
    (out,) = tmp_path.glob("cut_sharp.*")  # a .ts becomes an .mp4
    written = len(decoded(out))
    assert res.exit_code == 1, res.output
    assert written + int(res.stderr.split(" frame(s)")[0].split()[-1]) == 35, res.stderr


def test_row15_avi_is_refused_as_an_output_before_any_work(tmp_path, models):
    """Issue 40 row 15: AVI has no timestamps (a VFR clip came out at 1000 fps, audio 0.12 s off): `-o
    x.avi` is refused at planning; an .avi input is still read (and written as .mp4)."""
    clip = write_clip(tmp_path / "a.mp4", frames(2, 32, 32), audio=True)
    res = sharpen(clip, "-o", tmp_path / "x.avi", model=models["same"])
    assert res.exit_code == 1 and "AVI cannot keep frame times" in res.stderr, res.output
    assert not (tmp_path / "x.avi").exists()


def test_row06_joined_segments_whose_timestamps_go_back_are_written_continuous(tmp_path, models):
    """Issue 40 row 6: two transport streams joined end to end (the second starts again at 0) with audio:
    FFmpeg's muxer refused the copied audio ('returned 22'); now every stream continues from its last
    timestamp, and a note says where."""
    a = write_clip(tmp_path / "a.ts", frames(6, 64, 48), audio=True)
    b = write_clip(tmp_path / "b.ts", frames(6, 64, 48, seed=1), audio=True)
    joined = tmp_path / "j.ts"
    joined.write_bytes(a.read_bytes() + b.read_bytes())
    res = sharpen(joined, "-o", tmp_path / "j.mkv", model=models["same"])
    assert res.exit_code == 0, res.output
    assert "timestamps go back" in res.output
    assert len(decoded(tmp_path / "j.mkv")) == 12
    times = [t for _, t, _ in packets(tmp_path / "j.mkv", "audio")]
    assert times == sorted(times) and len(set(times)) == len(times)
