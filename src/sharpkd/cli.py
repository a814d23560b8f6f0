"""`sharpkd ...`: the command line. Thin: each command parses options and calls a module.

`sharpen` and `bench` run on the deploy wing (sharpkd.deploy: the light install); `profile` and `ui` are the
pipeline's, imported inside those commands, so that without the pipeline extra they say in one line what
to install."""

from __future__ import annotations

import contextlib
import enum
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from sharpkd.errors import UserError

app = typer.Typer(
    help="sharpkd: image sharpening by knowledge distillation (a DVC + MLflow + PyTorch pipeline).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
PIPELINE_EXTRA = "pip install 'sharpkd[pipeline]'"


def _show_version(value: bool) -> None:
    if value:
        from sharpkd import __version__

        print(f"sharpkd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """sharpkd: image sharpening by knowledge distillation (a DVC + MLflow + PyTorch pipeline)."""


@contextlib.contextmanager
def _needs_pipeline(command: str) -> Iterator[None]:
    """A pipeline command run where the training stack is not installed: one line naming the extra."""
    try:
        yield
    except ModuleNotFoundError as exc:
        print(f"error: `sharpkd {command}` needs the training stack ({exc.name} is missing): {PIPELINE_EXTRA}",
              file=sys.stderr)  # fmt: skip
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """A UserError becomes one line on stderr and exit status 1, never a traceback."""
    # File names that are not UTF-8 reach messages as lone surrogates: print them escaped, never crash.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None


@contextlib.contextmanager
def _stopped_by_signals(command: str) -> Iterator[None]:
    """SIGTERM stops the command as Ctrl-C does, through every cleanup (no temporary is left; what was
    finished is kept), with exit status 143 (130 for Ctrl-C) and one line."""
    import signal
    import threading

    got: list[int] = []

    def stop(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    except KeyboardInterrupt:
        signum = got[0] if got else signal.SIGINT
        why = "terminated" if signum == signal.SIGTERM else "interrupted"
        print(
            f"{command}: {why}; the outputs listed above are complete, no partial file is left",
            file=sys.stderr,
        )
        raise typer.Exit(128 + signum) from None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Run a TorchScript .pt --model that is not this checkout's export (models/export/model_card.json "
        "records its sha256): its code runs, so only for a file you trust.",
    ),
]


@app.command(no_args_is_help=True)
def sharpen(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT", help="Image or video files, folders (recursive) or globs (quote them)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="With one input file: the output file. Otherwise: a folder. "
            "Default: <name>_sharp.<ext> beside each input (videos: .mp4, .m4v, .mov and .mkv keep their "
            "container, others become .mp4).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="A .onnx (default: this checkout's models/export/student_int8.onnx, else student.onnx), "
            "TorchScript .pt or student .pth (these two need the pipeline extra), or a registered student: "
            "models:/sharpkd-student/3, models:/sharpkd-student@champion (MLflow store).",
        ),
    ] = None,
    device: Annotated[Device, typer.Option(help="Where the model runs.")] = Device.cpu,
    tile: Annotated[
        int | None,
        typer.Option(help="Tile side in pixels (default: 256; video frames: whole up to 4K)."),
    ] = None,
    overlap: Annotated[int | None, typer.Option(help="Tile overlap in pixels (default: 16).")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing outputs, even an input.")
    ] = False,
    preview: Annotated[
        bool, typer.Option("--preview", help="Also write <output>_preview: input | sharpened, side by side.")
    ] = False,
    codec: Annotated[
        str,
        typer.Option(
            help="Video encoder (FFmpeg's name): libx264, libx265, libsvtav1, h264_nvenc, hevc_nvenc..."
        ),
    ] = "libx264",
    crf: Annotated[
        int | None,
        typer.Option(
            help="Video constant quality, lower is better (default: 18 for libx264, 20 for libx265)."
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="Video encoder preset: ultrafast ... veryslow (x264/x265), p1-p7 (NVENC)."),
    ] = None,
    batch: Annotated[
        int, typer.Option(help="Video frames per model call (0: 4 on CUDA, 1 on the CPU).", min=0)
    ] = 0,
    trust_code: TrustCode = False,
) -> None:
    """Sharpen images (PNG, JPEG, WebP, TIFF; alpha, 16-bit and EXIF orientation kept) and videos (anything
    FFmpeg reads; H.264 out; audio and subtitles copied; size, timing, rotation and colour tags kept)."""
    from sharpkd.deploy.encoding import VideoOptions
    from sharpkd.deploy.sharpen import sharpen_paths
    from sharpkd.deploy.torch_models import trusting_code

    video = VideoOptions(codec=codec, crf=crf, preset=preset, batch=batch)
    with _user_errors(), _stopped_by_signals("sharpen"), trusting_code(trust_code):
        code = sharpen_paths(
            inputs, output, model, device.value, tile, overlap, overwrite, preview, video=video
        )
    raise typer.Exit(code)


@app.command()
def bench(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Student .onnx, .pt or .pth (default: this checkout's models/export/student.onnx and, with the "
            "pipeline extra, models/student/student.pth), "
            "or a registered student: models:/sharpkd-student/3, models:/sharpkd-student@champion.",
        ),
    ] = None,
    teacher: Annotated[
        bool, typer.Option("--teacher", help="Also time the teacher (models/teacher; the pipeline extra).")
    ] = False,
    sizes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: 720p, 1080p, 4k or WxH (default: 720p,1080p,4k; --video: 1080p)."
        ),
    ] = None,
    repeats: Annotated[
        int, typer.Option(help="Timed runs per figure (median), after one warm-up.", min=1)
    ] = 5,
    threads: Annotated[
        int, typer.Option(help="ONNX Runtime (and torch) CPU threads (0: their default).", min=0)
    ] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
    video: Annotated[
        bool,
        typer.Option(
            "--video",
            help="Instead: a clip sharpened end to end (decode, sharpen, encode; `sharpkd sharpen`) against the "
            "model alone (default model: models/export/student_int8.onnx, else student.onnx).",
        ),
    ] = False,
    frames: Annotated[int, typer.Option(help="--video: frames in the clip (30 fps).", min=2)] = 150,
    trust_code: TrustCode = False,
) -> None:
    """Milliseconds per frame and frames/s of the student (torch, ONNX Runtime; CUDA when present) and the teacher;
    with --video, of a video sharpened end to end beside the model alone."""
    from rich.console import Console

    from sharpkd.deploy.bench import DEFAULT_SIZES, check_output_file, render_table, run_bench
    from sharpkd.deploy.bench_video import VIDEO_SIZES, run_video_bench, video_lines
    from sharpkd.deploy.torch_models import trusting_code
    from sharpkd.files import write_json

    console = Console()
    with _user_errors(), trusting_code(trust_code):
        if video and teacher:  # the video bench times the student only: refused, not silently dropped
            raise UserError(
                "--teacher: not timed with --video; run `sharpkd bench --teacher` without --video"
            )
        check_output_file(json_path, "--json")  # before any timing
        with console.status("timing...") as status:

            def progress(what: str) -> None:
                status.update(f"timing {what}")

            if video:
                result = run_video_bench(
                    model, sizes or VIDEO_SIZES, frames, repeats, threads, progress=progress
                )
            else:
                result = run_bench(
                    model, teacher, sizes or DEFAULT_SIZES, repeats, threads, progress=progress
                )
        for note in result["notes"]:
            console.print(note, soft_wrap=True, markup=False, highlight=False)
        console.print(render_table(result))
        for line in video_lines(result):
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        if json_path is not None:
            write_json(json_path, result)
            console.print(f"wrote {json_path}", markup=False)


@app.command()
def zoo() -> None:
    """The trained students that ship with sharpkd (zoo:NAME for --model and student.init), with their figures."""
    from rich.console import Console
    from rich.table import Table

    from sharpkd.deploy import zoo as shipped

    with _user_errors():
        table = Table(
            "name", "student", "params", "Set5 dB fp32 / INT8", "Manga109 dB fp32 / INT8", "INT8 ms", "CPU"
        )
        for name in shipped.names():
            c = shipped.card(name)
            q, s, a = c.get("quality", {}), c.get("speed", {}), c.get("arch", {})

            def dbs(set_name: str, q=q) -> str:
                r = q.get(set_name, {})
                return " / ".join(
                    "n/a" if r.get(k) is None else f"{r[k]:.2f}" for k in ("psnr_fp32", "psnr_int8")
                )

            ms = s.get("int8_ms")
            table.add_row(
                f"zoo:{name}",
                f"rep {a.get('channels')} x {a.get('blocks')}: {c.get('title', '')}",
                f"{c.get('params', 0):,}",
                dbs("Set5"),
                dbs("Manga109"),
                "not timed" if ms is None else f"{ms:.0f}",
                s.get("cpu", ""),
            )
        Console(width=200).print(table)
        print(f"model cards: {shipped.ZOO_DIR}/NAME/card.md")


@app.command(no_args_is_help=True)
def adapt(
    inputs: Annotated[list[Path], typer.Argument(help="A folder of clips and images, or clips and images.")],
    start: Annotated[
        str, typer.Option("--from", help="The student to fine-tune: zoo:NAME or a student .pth.")
    ] = "zoo:balanced",
    name: Annotated[
        str | None, typer.Option(help="The DVC experiment's name (default: adapt-FOLDER-TIME).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-S", help="KEY=VALUE over params.yaml and the recipe (profiles/adapt.yaml)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the command; run nothing.")
    ] = False,
) -> None:
    """Fine-tune a zoo student to your own footage: the teacher labels frames of INPUTS, the student trains
    on them beside the labelled photographs, then evaluate, export and MLflow, as one DVC experiment."""
    with _user_errors(), _needs_pipeline("adapt"):
        from sharpkd.adapt import plan, run

        adapt_plan = plan(inputs, start, name, set_)
        if dry_run:
            import shlex

            print(shlex.join(adapt_plan.command))
            return
    with _user_errors():
        raise typer.Exit(run(adapt_plan))


profile_app = typer.Typer(
    help="Experiment profiles (profiles/*.yaml): overlays of params.yaml queued as DVC experiments.",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")

ProfileFile = Annotated[Path, typer.Argument(help="A profile, e.g. profiles/reference.yaml.")]


@profile_app.command("queue")
def profile_queue(
    profile: ProfileFile,
    arm: Annotated[
        list[str] | None, typer.Option("--arm", help="Only this arm (repeatable; default: all).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the commands; queue nothing.")
    ] = False,
) -> None:
    """Validate every arm against params.yaml, then `dvc exp run --queue` each (same-named ones replaced)."""
    with _user_errors(), _needs_pipeline("profile queue"):
        from sharpkd.profiles import load_profile, queue

        queue(load_profile(profile), arm, dry_run=dry_run)


@profile_app.command("run")
def profile_run(
    profiles: Annotated[list[Path], typer.Argument(help="One or more profiles, queued together.")],
    jobs: Annotated[
        int | None, typer.Option(help="Experiments at once (default: the first profile's `jobs`).", min=1)
    ] = None,
) -> None:
    """Queue every arm of the profiles, then run the queue (`dvc exp run --run-all -j JOBS`)."""
    import subprocess

    with _user_errors(), _needs_pipeline("profile run"):
        from sharpkd.profiles import check_profiles, load_profile, queue

        loaded = [load_profile(p) for p in profiles]
        check_profiles(loaded)  # every arm of every profile, before the first is queued
        for p in loaded:
            queue(p)
    raise typer.Exit(
        subprocess.run(["dvc", "exp", "run", "--run-all", "-j", str(jobs or loaded[0].jobs)]).returncode
    )


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=1, max=65535)] = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 against this project's tracking store (mlflow.db, mlartifacts/)."""
    import os

    with _user_errors(), _needs_pipeline("ui"):
        from sharpkd.tracking import ui_command

        cmd, note = ui_command(port)
    print(note, flush=True)
    if cmd is None:
        return
    # MLflow's background job workers (GenAI scorers; several processes) serve nothing here.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # Replace this process: Ctrl-C and kill reach the server directly.
    os.execve(cmd[0], cmd, env)
