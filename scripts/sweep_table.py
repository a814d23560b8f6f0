"""The README's student-size sweep: Set5 PSNR against ms per 1080p frame, float32 and INT8 (never typed by hand).

Usage: python scripts/sweep_table.py [EXPERIMENT ...] [--prefix sweep-] [--profile profiles/sweep.yaml] [--doc docs/results.md] [--block sweep] [--plot docs/sweep.png] [--published] [--sizes 64x5,32x4] [--profile-ops] [--float-io] [--out metrics/speeds.json]

Quality comes from each DVC experiment's metrics (metrics/eval.json: Set5.student.psnr; metrics/export.json:
int8.Set5.psnr_int8). Speed is measured here, side by side in one run on an otherwise idle machine, for each
architecture in the sweep (a rep student folds into the plain network of the same width and depth, so speed
depends on width and depth only): ONNX Runtime on the CPU, `--threads` threads, float32 and INT8, median
of `--repeats` after warm-up, one session alive at a time. With --doc the table replaces what stands
between the `<!-- BLOCK:start -->` and `<!-- BLOCK:end -->` markers (--block, default sweep). With
--published a second table sets the students beside the published models of their size
(sharpkd.report.PUBLISHED_STUDENTS, with their sources; not re-measured here). --sizes times more
architectures beside them with no experiment (or alone, when no experiment is named); --profile-ops adds
each one's share of INT8 kernel time outside the convolutions; --float-io times each INT8 graph with float32
image I/O too (the INT8 export takes the 8-bit image). The figures go to --out (metrics/speeds.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

QUALITY_SET = "Set5"


def sweep_experiments(names: list[str], prefix: str) -> dict[str, dict]:
    """name -> flat params + metrics of each named experiment (or of every experiment whose name has `prefix`)."""
    import dvc.api

    found: dict[str, dict] = {}
    for row in dvc.api.exp_show(num=-1):
        name = row.get("Experiment")
        if name and (name in names or (not names and name.startswith(prefix))) and name not in found:
            # exp_show prefixes a column with its file only when two files share the key.
            found[name] = {k.split(":", 1)[-1]: v for k, v in row.items()}
    missing = [n for n in names if n not in found]
    if missing or not found:
        raise SystemExit(
            f"error: no DVC experiment {', '.join(missing) or f'named {prefix}*'} (see `dvc exp show`)"
        )
    return found


def ms_key(precision: str) -> str:
    """The key of the ONNX Runtime CPU figure of one precision (fp32, int8) on a 1080p frame (sharpkd.deploy.timing)."""
    from sharpkd.deploy.timing import figure_name, speed_key

    return speed_key(figure_name("student", "onnxruntime", "cpu", precision))


def measure(
    scale: int,
    channels: int,
    blocks: int,
    threads: int,
    repeats: int,
    profile_ops: bool = False,
    float_io: bool = False,
) -> dict:
    """The figures (sharpkd.deploy.timing keys) of the exported float32 and INT8 student of this size (random weights)
    on a 1080p frame; with `profile_ops`, also "int8_ops": the INT8 graph's kernel ms per frame by op type;
    with `float_io`, also "int8_float_io_ms": the INT8 graph with float32 image I/O (quantize.IMAGE_IO)."""
    import numpy as np
    import torch

    from sharpkd.deploy import timing
    from sharpkd.deploy.timing import onnx_target
    from sharpkd.models.student import Student
    from sharpkd.onnx_export import export_onnx
    from sharpkd.quantize import quantize_student

    torch.manual_seed(0)
    model = Student(scale=scale, channels=channels, blocks=blocks).eval()
    with torch.no_grad():
        # Not the identity, and no zero bias: with all-zero biases ONNX Runtime's INT8 convs ran 2.6x
        # slower here (98 against 37 ms for 32 x 4), which a trained student never sees.
        model.tail.weight.normal_(0, 1e-2)
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 1e-2)
    rng = np.random.default_rng(0)
    calibration = [rng.random((1, 3, 96, 96), dtype=np.float32) for _ in range(8)]
    with tempfile.TemporaryDirectory(prefix="sharpkd-sweep-") as tmp:
        fp32 = export_onnx(model, Path(tmp) / "s.onnx")
        int8 = Path(tmp) / "s_int8.onnx"
        quantize_student(fp32, int8, calibration)
        figures = timing.measure(
            [onnx_target(fp32, "cpu", threads), onnx_target(int8, "cpu", threads)], repeats
        )
        if float_io:
            quantize_student(fp32, Path(tmp) / "f_int8.onnx", calibration, image_io="float32")
            other = timing.measure([onnx_target(Path(tmp) / "f_int8.onnx", "cpu", threads)], repeats)
            figures["int8_float_io_ms"] = other[ms_key("int8")]
        if profile_ops:
            figures["int8_ops"] = op_profile(int8, threads)
        return figures


CONV_OPS = {"Conv", "QLinearConv", "ConvInteger"}


def op_profile(path: Path, threads: int, runs: int = 4) -> dict[str, float]:
    """Kernel ms per 1080p frame by op type (ONNX Runtime's profiler, the mean of `runs` runs, the first
    included): where the frame's time goes besides the convolutions. Profiling adds to each kernel, so
    read shares, not ms."""
    import json

    from sharpkd.deploy.sessions import OnnxFunction, ort_session
    from sharpkd.deploy.timing import frame

    fn = OnnxFunction(ort_session(path, "cpu", threads, profile_prefix=str(path.with_suffix(""))))
    x = fn.native(frame())  # the frame in the model's own pixel type, as the timing path feeds it
    for _ in range(runs):
        fn.run_native(x)
    events = json.loads(Path(fn.session.end_profiling()).read_text())
    ms: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            ms[op] = ms.get(op, 0.0) + e["dur"] / 1000 / runs
    return dict(sorted(ms.items(), key=lambda kv: -kv[1]))


def outside_convs(ops: dict[str, float]) -> float:
    """The share of the kernel time that is not a convolution."""
    total = sum(ops.values())
    return sum(v for k, v in ops.items() if k not in CONV_OPS) / total if total else 0.0


def _num(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point is at least as fast and at least as good, and better in one."""
    return [
        not any(
            (m2 <= m1 and p2 >= p1) and (m2 < m1 or p2 > p1) for j, (m2, p2) in enumerate(points) if j != i
        )
        for i, (m1, p1) in enumerate(points)
    ]


def build_rows(exps: dict[str, dict], speeds: dict[tuple[int, int], dict]) -> list[dict]:
    rows = []
    for name, m in sorted(exps.items()):
        size = (int(m["student.channels"]), int(m["student.blocks"]))
        rows.append(
            {
                "experiment": name,
                "block": m.get("student.block", "plain"),
                "size": size,
                "params": _num(m.get("student.params")),
                "psnr_fp32": _num(m.get(f"{QUALITY_SET}.student.psnr")),
                "psnr_int8": _num(m.get(f"int8.{QUALITY_SET}.psnr_int8")),
                "ms_fp32": speeds[size][ms_key("fp32")],
                "ms_int8": speeds[size][ms_key("int8")],
                # train.json had no precision before CPU bf16 training existed; those runs were fp32.
                "train_precision": m.get("precision") if m.get("precision") not in (None, "None") else "fp32",
                "train_minutes": None if _num(m.get("seconds")) is None else _num(m["seconds"]) / 60,
                "lr": _num(m.get("distill.lr")),
                "warmup": _num(m.get("distill.warmup_steps")),
            }
        )
    for row in rows:
        ops = speeds[row["size"]].get("int8_ops")
        row["outside_convs"] = None if ops is None else outside_convs(ops)
        row["ms_int8_float_io"] = speeds[row["size"]].get("int8_float_io_ms")
    return rows


def speed_only_rows(
    sizes: list[tuple[int, int]], speeds: dict[tuple[int, int], dict], scale: int
) -> list[dict]:
    """Rows for architectures timed with no experiment behind them (--sizes): speed, no quality."""
    from sharpkd.models import count_params
    from sharpkd.models.student import Student

    rows = []
    for size in sizes:
        ops = speeds[size].get("int8_ops")
        rows.append(
            {
                "experiment": None, "block": "plain", "size": size,
                "params": float(count_params(Student(scale, *size))),
                "psnr_fp32": None, "psnr_int8": None,
                "ms_fp32": speeds[size][ms_key("fp32")], "ms_int8": speeds[size][ms_key("int8")],
                "train_precision": None, "train_minutes": None, "lr": None, "warmup": None,
                "outside_convs": None if ops is None else outside_convs(ops),
                "ms_int8_float_io": speeds[size].get("int8_float_io_ms"),
            }
        )  # fmt: skip
    return rows


def render(rows: list[dict], threads: int, cpu: str) -> str:
    def f(v, d):
        return "n/a" if v is None else f"{v:.{d}f}"

    # Rows timed with no experiment (speed only) have no quality: they are neither on the front nor beating it.
    trained = [r for r in rows if r["experiment"] is not None]
    front = {
        key: dict(
            zip(
                map(id, trained),
                pareto([(r[f"ms_{key}"], r[f"psnr_{key}"] or 0.0) for r in trained]),
                strict=True,
            )
        )
        for key in ("fp32", "int8")
    }
    best = {key: [front[key].get(id(r), False) for r in rows] for key in ("fp32", "int8")}
    profiled = any(r.get("outside_convs") is not None for r in rows)
    float_io = any(r.get("ms_int8_float_io") is not None for r in rows)
    lines = [
        f"| experiment | block | channels x blocks | params | {QUALITY_SET} PSNR fp32 / INT8 "
        "| ms / 1080p fp32 / INT8 | Pareto (fp32 / INT8) | training: lr, warm-up, precision, minutes |"
        + (" INT8 time outside convs |" if profiled else "")
        + (" INT8 ms, float32 image I/O |" if float_io else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if profiled else "") + ("---|" if float_io else ""),
    ]
    for i, r in enumerate(rows):
        params = "" if r["params"] is None else f"{int(r['params']):,}"
        name = "(speed only)" if r["experiment"] is None else f"`{r['experiment']}`"
        share = r.get("outside_convs")
        lines.append(
            f"| {name} | {r['block']} | {r['size'][0]} x {r['size'][1]} | {params} "
            f"| {f(r['psnr_fp32'], 2)} / {f(r['psnr_int8'], 2)} | {r['ms_fp32']:.0f} / {r['ms_int8']:.0f} "
            f"| {'yes' if best['fp32'][i] else ''} / {'yes' if best['int8'][i] else ''} "
            f"| {'n/a' if r['lr'] is None else format(r['lr'], 'g')}, {f(r['warmup'], 0)}, "
            f"{r['train_precision'] or 'n/a'}, {f(r['train_minutes'], 0)} |"
            + ((" n/a |" if share is None else f" {share:.0%} |") if profiled else "")
            + (f" {f(r.get('ms_int8_float_io'), 0)} |" if float_io else "")
        )
    lines += [
        "",
        f"ms: ONNX Runtime, {threads} threads, {cpu}, measured side by side in one run by scripts/sweep_table.py.",
        "Training: peak learning rate and warm-up steps (`distill.lr`, `distill.warmup_steps`), the precision of",
        "its passes (`compute.amp`) and its wall-clock minutes (metrics/train.json).",
    ]
    if profiled:
        lines += [
            "INT8 time outside convs: the share of the INT8 graph's kernel time (ONNX Runtime's profiler, 1080p)",
            "spent in other ops: quantising, rearranging, the residual Add (metrics/speeds.json has them by op).",
        ]
    if float_io:
        lines += [
            "INT8 takes and gives the 8-bit image (uint8); the last column times the same INT8 graph with",
            "float32 image I/O (its residual Add and the frame's (de)quantisation in float32), in the same run.",
        ]
    return "\n".join(lines)


def render_published(rows: list[dict]) -> str:
    """Our students (the INT8 ms measured above) and the published models, by parameter count."""
    from sharpkd.report import PUBLISHED_STUDENTS

    def f(v, d):
        return "n/a" if v is None else f"{v:.{d}f}"

    entries = [
        (r["params"] or 0, f"ours: `{r['experiment']}` ({r['block']} {r['size'][0]} x {r['size'][1]})",
         r["psnr_fp32"], r["psnr_int8"], r["ms_int8"], "this repository")
        for r in rows
        if r["experiment"] is not None
    ] + [(p, name, psnr, int8, ms, src) for name, (p, psnr, int8, ms, src) in PUBLISHED_STUDENTS.items()]  # fmt: skip
    lines = [
        f"| model | params | {QUALITY_SET} PSNR | INT8 {QUALITY_SET} PSNR | ms / 1080p frame | source |",
        "|---|---|---|---|---|---|",
    ]
    for params, name, psnr, int8, ms, src in sorted(entries, key=lambda e: e[0]):
        lines.append(f"| {name} | {int(params):,} | {f(psnr, 2)} | {f(int8, 2)} | {f(ms, 0)} | {src} |")
    lines += [
        "",
        "Ours: ms in INT8, measured above. Published: Set5 as issue 26 measured it from the public checkpoints",
        "(Y, border 4), INT8 after a plain static quantisation where measured; FSRCNN's ms is OpenCV's float32",
        "model on this CPU; n/a: not measured (their checkpoints are not on these machines).",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for key, marker in (("fp32", "o"), ("int8", "s")):
        pts = [
            (r[f"ms_{key}"], r[f"psnr_{key}"], r["experiment"]) for r in rows if r[f"psnr_{key}"] is not None
        ]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=key.upper())
        for ms, psnr, name in pts:
            ax.annotate(name, (ms, psnr), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("ms per 1080p frame (ONNX Runtime, CPU)")
    ax.set_ylabel(f"{QUALITY_SET} PSNR (dB, Y)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def replace_block(text: str, block: str, name: str = "sweep") -> str:
    """`text` with `block` between the `name` markers (results_table's, one way of doing it)."""
    from results_table import replace_block as replace  # scripts/ is on sys.path: the script's folder

    return replace(text, block, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="*", help="DVC experiment names (default: all with --prefix)")
    ap.add_argument("--prefix", default="sweep-")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", type=Path, help="the experiments of this profile's `table` (else its arms)")
    ap.add_argument("--doc", type=Path, help="write the table and the plot's link into this file")
    ap.add_argument("--block", default="sweep", help="the markers' name in --doc")
    ap.add_argument("--plot", type=Path, default=Path("docs/sweep.png"))
    ap.add_argument("--published", action="store_true", help="add the table against published models")
    ap.add_argument(
        "--sizes",
        default="",
        help="also time these architectures with no experiment, e.g. 64x5,32x4 (speed only)",
    )
    ap.add_argument(
        "--profile-ops", action="store_true", help="add each size's INT8 time outside the convolutions"
    )
    ap.add_argument(
        "--float-io", action="store_true", help="also time each size's INT8 graph with float32 image I/O"
    )
    ap.add_argument("--out", type=Path, default=Path("metrics/speeds.json"), help="the measured figures")
    args = ap.parse_args()
    try:
        extra = [
            tuple(int(v) for v in item.lower().split("x")) for item in args.sizes.split(",") if item.strip()
        ]
        if any(len(size) != 2 or min(size) < 1 for size in extra):
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"error: --sizes {args.sizes!r}: expected CHANNELSxBLOCKS[,...], e.g. 64x5,32x4"
        ) from None

    from sharpkd.deploy.timing import cpu_name
    from sharpkd.files import write_json, write_text

    names = list(args.experiments)
    if args.profile:
        from sharpkd.profiles import load_profile

        profile = load_profile(args.profile)
        names += list(profile.table) or [a.name for a in profile.arms]
    exps = sweep_experiments(names, args.prefix) if names or not extra else {}
    if exps:
        scale = int(next(iter(exps.values()))["data.scale"])
    else:
        from sharpkd.config import load_params

        scale = load_params().data.scale
    trained = {(int(m["student.channels"]), int(m["student.blocks"])) for m in exps.values()}
    sizes = sorted(trained | set(extra))
    speeds = {
        size: measure(scale, *size, args.threads, args.repeats, args.profile_ops, args.float_io)
        for size in sizes
    }
    figures = {"cpu": cpu_name(), "threads": args.threads, "repeats": args.repeats, "scale": scale}
    figures["sizes"] = {f"{c}x{b}": speeds[(c, b)] for c, b in sizes}
    write_json(args.out, figures)
    rows = build_rows(exps, speeds) + speed_only_rows(sorted(set(extra) - trained), speeds, scale)
    table = render(rows, args.threads, cpu_name())
    if args.published:
        table += "\n\n" + render_published(rows)
    print(table)
    if exps:  # speed alone has nothing to plot against
        plot(rows, args.plot)
    if args.doc:
        link = Path(os.path.relpath(args.plot, args.doc.parent)).as_posix()
        block = f"{table}\n\n![quality against speed]({link})" if exps else table
        write_text(args.doc, replace_block(args.doc.read_text(), block, args.block))
        print(f"wrote the table into {args.doc}" + (f", the plot to {args.plot}" if exps else ""))
    print(f"wrote the figures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
