"""The student zoo's release files (src/sharpkd/deploy/zoo/NAME/) and its table in docs/results.md.

Usage:
  python scripts/zoo_release.py publish NAME --title TITLE --order N [--checkout DIR] [--experiment EXP]
  python scripts/zoo_release.py time [--threads 2] [--repeats 10] [--rounds 3] [--peers ../shared/peers]
  python scripts/zoo_release.py table [--doc docs/results.md]
  python scripts/zoo_release.py adapt-table [--checkout DIR] [--doc docs/results.md]

publish: a finished zoo arm (profiles/zoo.yaml) made into a release folder. Run it in the checkout where
the arm's outputs are the workspace's (`dvc exp apply EXP`, or --checkout DIR): it copies the INT8 and
float32 ONNX and the folded weights, and writes card.json (each file's sha256, what made it, the figures
of metrics/eval.json and metrics/export.json) and card.md, the model card a person reads.
time: every zoo student's INT8 and float32 ONNX beside OpenCV's FSRCNN (../shared/peers), one 1080p frame
each, in interleaved rounds in one run (sharpkd.deploy's timing path); the figures go into each card and
metrics/zoo_speed.json. FSRCNN needs opencv-contrib-python-headless < 5 (docs/zoo.md).
table: the zoo block of docs/results.md, from the cards (never typed by hand).
adapt-table: the adapt block, from the last `sharpkd adapt` run of a checkout against its zoo student.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sharpkd.deploy import zoo  # noqa: E402

FILES = {"models/export/student_int8.onnx": "student_int8.onnx"}
FILES |= {"models/export/student.onnx": "student.onnx", "models/student/student.pth": "student.pth"}
RECIPE_KEYS = (
    "teacher.source",
    "data.source",
    "data.scale",
    "data.patch_size",
    "degradation.jpeg_prob",
    "student.block",
    "student.init",
    "distill.steps",
    "distill.batch_size",
    "distill.lr",
    "distill.warmup_steps",
    "distill.teacher_only_fraction",
    "distill.ema",
    "loss.pixel",
    "loss.kd",
    "data.teacher_only.upcycle",
    "compute.amp",
    "seed",
)


def _json(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: run the arm to its end (dvc exp apply EXP) first")
    return json.loads(path.read_text())


def quality(evaluation: dict, export: dict) -> dict:
    """set -> PSNR / SSIM in float32 (metrics/eval.json) and INT8 (the export's own scoring)."""
    sets = sorted({k.split(".")[0] for k in evaluation if k.endswith(".student.psnr")})
    out = {}
    for s in sets:
        out[s] = {
            "psnr_fp32": evaluation.get(f"{s}.student.psnr"),
            "ssim_fp32": evaluation.get(f"{s}.student.ssim"),
            "psnr_int8": export.get(f"int8.{s}.psnr_int8"),
            "ssim_int8": export.get(f"int8.{s}.ssim_int8"),
            "int8_cost_db": export.get(f"int8.{s}.psnr_cost"),
            "bicubic_psnr": evaluation.get(f"{s}.bicubic.psnr"),
            "teacher_psnr": evaluation.get(f"{s}.teacher.psnr"),
            "images": evaluation.get(f"{s}.images"),
        }
    return out


def f(v, d: int = 2) -> str:
    """A figure with d decimals, n/a where it was not measured (the cards and tables alike)."""
    return "n/a" if v is None else f"{v:.{d}f}"


def build_card(name: str, title: str, order: int, checkout: Path, experiment: str, folder: Path) -> dict:
    export_card = _json(checkout / "models/export/model_card.json")
    train = _json(checkout / "metrics/train.json")
    used = export_card.get("params_used", {})
    arch = export_card.get("architecture", {})
    training = {
        k: train.get(k)
        for k in ("steps", "best_step", "val_psnr", "seconds", "steps_per_s", "precision", "init_sha256")
    }
    training["init_sha256"] = training["init_sha256"] or (export_card.get("training") or {}).get(
        "init_sha256"
    )
    training["total_steps"] = _total_steps(training, used.get("student.init"))
    return {
        "name": name,
        "title": title,
        "order": order,
        "arch": {k: arch.get(k) for k in ("scale", "channels", "blocks", "activation") if k in arch},
        "params": export_card.get("params"),
        "gmacs_1080p": export_card.get("gmacs_1080p"),
        "io": {
            "student_int8.onnx": "uint8 RGB in, uint8 RGB out, (N,3,H,W), any H, W",
            "student.onnx": "float32 RGB in [0, 1] in and out, (N,3,H,W), any H, W",
            "student.pth": "folded plain weights (sharpkd Student), what student.init fine-tunes from",
        },
        "files": {
            f.name: {"bytes": f.stat().st_size, "sha256": zoo.sha256(f)} for f in sorted(folder.iterdir())
        },
        "made_by": {
            "experiment": experiment,
            "profile": "profiles/zoo.yaml",
            "sharpkd_version": export_card.get("sharpkd_version"),
        },
        "teacher": {k: v for k, v in (export_card.get("teacher") or {}).items() if not isinstance(v, dict)},
        "data": {k: v for k, v in (export_card.get("data") or {}).items() if k != "degradation"},
        "recipe": {k: used.get(k) for k in RECIPE_KEYS if k in used},
        "training": training,
        "quality": quality(export_card.get("evaluation") or {}, export_card.get("int8") or {}),
        "int8": {k: v for k, v in (export_card.get("int8") or {}).items() if k.count(".") == 1},
        "speed": {},
    }


def card_md(card: dict) -> str:
    """The model card a person reads, from card.json."""

    a = card["arch"]
    q = card["quality"]
    s = card.get("speed") or {}
    lines = [
        f"# zoo:{card['name']}: {card['title']}",
        "",
        f"A rep {a.get('channels')} x {a.get('blocks')} student (x{a.get('scale')}, {a.get('activation')}), "
        f"folded to a plain CNN of {card['params']:,} parameters ({card['gmacs_1080p']} GMACs per 1080p frame).",
        "Run it with `sharpkd sharpen IN -o OUT --model zoo:" + card["name"] + "`; fine-tune it with "
        f"`student.init: zoo:{card['name']}` or `sharpkd adapt FOOTAGE --from zoo:{card['name']}`.",
        "",
        "## How it was made",
        "",
        f"- teacher: {card['teacher'].get('name') or card['teacher'].get('source', 'n/a')} "
        f"({card['teacher'].get('params') or 0:,} params), pretrained",
        f"- data: {_images(card['data'])}",
        f"- recipe: {', '.join(f'`{k}={v}`' for k, v in card['recipe'].items())}",
        f"- training: {card['training'].get('steps')} steps, best validation at step "
        f"{card['training'].get('best_step')} ({f(card['training'].get('val_psnr'))} dB), "
        f"{f((card['training'].get('seconds') or 0) / 60, 0)} min ({card['training'].get('precision')})",
        *_started_from(card),
        f"- experiment `{card['made_by']['experiment']}` of `{card['made_by']['profile']}` (docs/zoo.md)",
        "",
        "## Quality (PSNR / SSIM on Y, border 4 cropped)",
        "",
        "| set | images | bicubic | float32 | INT8 | INT8 cost | teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in q.items():
        lines.append(
            f"| {name} | {r.get('images')} | {f(r['bicubic_psnr'])} | {f(r['psnr_fp32'])} / {f(r['ssim_fp32'], 4)} "
            f"| {f(r['psnr_int8'])} / {f(r['ssim_int8'], 4)} | {f(r['int8_cost_db'], 3)} dB | {f(r['teacher_psnr'])} |"
        )
    lines += ["", "## Speed (ms per 1080p output frame, ONNX Runtime on the CPU)", ""]
    if s:
        lines.append(
            f"INT8 {f(s.get('int8_ms'), 1)} ms, float32 {f(s.get('fp32_ms'), 1)} ms; OpenCV's FSRCNN "
            f"{f(s.get('fsrcnn_ms'), 1)} ms in the same run ({f(s.get('x_faster_than_fsrcnn'))} times faster); "
            f"{s.get('cpu')}, {s.get('threads')} threads, {s.get('date')}."
        )
    else:
        lines.append("Not timed yet (`python scripts/zoo_release.py time`).")
    lines += ["", "## Files", "", "| file | bytes | sha256 | what |", "|---|---|---|---|"]
    lines += [
        f"| {n} | {v['bytes']:,} | `{v['sha256']}` | {card['io'].get(n, '')} |"
        for n, v in card["files"].items()
    ]
    lines += ["", "sharpkd checks each file against its sha256 here before loading it.", ""]
    return "\n".join(lines)


def _total_steps(training: dict, init: str | None) -> int | None:
    """Steps from random weights: this run's, plus those of the zoo student it started from when that is
    the published one (its student.pth sha256 matches); None when the start is not known here."""
    if not training.get("init_sha256"):
        return training.get("steps")
    if not init or not zoo.is_zoo(init):
        return None
    start = zoo.card(zoo.name_of(init))
    if start["files"]["student.pth"]["sha256"] != training["init_sha256"]:
        return None
    before = start["training"].get("total_steps") or start["training"].get("steps")
    return before + training["steps"] if before and training.get("steps") else None


def _started_from(card: dict) -> list[str]:
    """A line naming the weights training started from, for a student fine-tuned from another (none else)."""
    sha = card["training"].get("init_sha256")
    if not sha:
        return []
    total = card["training"].get("total_steps")
    return [
        f"- started from `{card['recipe'].get('student.init')}` as it was then (student.pth sha256 `{sha}`): "
        f"{total or 'an unknown number of'} steps in all"
    ]


def _images(data: dict) -> str:
    images = data.get("images")
    if isinstance(images, dict):
        images = ", ".join(f"{n} {split}" for split, n in images.items())
    return (
        f"{images} images, x{data.get('scale')}, {data.get('source')} (profiles/zoo.yaml names the folders)"
    )


def write_card(folder: Path, card: dict) -> None:
    (folder / zoo.CARD).write_text(json.dumps(card, indent=2) + "\n")
    (folder / "card.md").write_text(card_md(card))


def publish(args) -> None:
    checkout = args.checkout.resolve()
    dest = zoo.ZOO_DIR / args.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.name}.", dir=zoo.ZOO_DIR))
    try:
        for src, name in FILES.items():
            if not (checkout / src).is_file():
                raise SystemExit(f"error: {checkout / src} not found: apply a finished zoo arm first")
            shutil.copyfile(checkout / src, tmp / name)
        card = build_card(args.name, args.title, args.order, checkout, args.experiment, tmp)
        old = dest / zoo.CARD
        if old.is_file():  # timings of the same files stay
            previous = json.loads(old.read_text())
            if previous.get("files", {}).get("student_int8.onnx") == card["files"]["student_int8.onnx"]:
                card["speed"] = previous.get("speed", {})
        write_card(tmp, card)
        tmp.chmod(0o755)  # mkdtemp's folder is private
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"published {dest}: {zoo.describe(args.name)}")


def fsrcnn_target(peers: Path, threads: int):
    """OpenCV's FSRCNN x4 on the 270 x 480 uint8 BGR frame whose x4 output is a 1080p frame."""
    import cv2
    import numpy as np

    from sharpkd.deploy.timing import Target

    path = peers / "FSRCNN_x4.pb"
    if not path.is_file() or not hasattr(cv2, "dnn_superres"):
        raise SystemExit(f"error: FSRCNN needs {path} and opencv-contrib-python-headless < 5 (docs/zoo.md)")
    cv2.setNumThreads(threads)

    def make(x):
        sr = cv2.dnn_superres.DnnSuperResImpl_create()
        sr.readModel(str(path))
        sr.setModel("fsrcnn", 4)
        lr = np.ascontiguousarray((x[0, :, ::4, ::4].transpose(1, 2, 0) * 255).astype(np.uint8))
        return lambda: sr.upsample(lr)

    return Target("fsrcnn", "opencv", "cpu", "fp32", make)


def time_side_by_side(names: list[str], peers: Path, threads: int, repeats: int, rounds: int) -> dict:
    """ms per 1080p output frame of each zoo student (INT8, float32) and FSRCNN: `rounds` rounds, each
    timing every model in turn (median of `repeats`), so a slow spell of the machine hits all alike;
    the figure is the median over rounds."""
    import datetime
    import statistics

    import cv2
    import onnxruntime

    from sharpkd.deploy.timing import cpu_name, frame, onnx_target, time_target

    targets = {("fsrcnn", "fp32"): fsrcnn_target(peers, threads)}
    for name in names:
        for kind in ("int8", "fp32"):
            targets[name, kind] = onnx_target(zoo.zoo_file(f"zoo:{name}", kind).path, "cpu", threads)
    x = frame()
    times: dict = {key: [] for key in targets}
    for r in range(rounds):
        for key, target in targets.items():
            times[key].append(time_target(target, x, repeats))
            print(f"round {r + 1}/{rounds}: {key[0]} {key[1]} {times[key][-1]:.1f} ms", flush=True)
    ms = {key: statistics.median(v) for key, v in times.items()}
    common = {
        "cpu": cpu_name(),
        "threads": threads,
        "date": datetime.date.today().isoformat(),
        "onnxruntime": onnxruntime.__version__,
        "opencv": cv2.__version__,
        "fsrcnn_ms": round(ms["fsrcnn", "fp32"], 2),
    }
    students = {
        n: {
            "int8_ms": round(ms[n, "int8"], 2),
            "fp32_ms": round(ms[n, "fp32"], 2),
            "x_faster_than_fsrcnn": round(ms["fsrcnn", "fp32"] / ms[n, "int8"], 2),
            **common,
        }
        for n in names
    }
    rounds_ms = {f"{k[0]}.{k[1]}": [round(t, 2) for t in v] for k, v in times.items()}
    return {"students": students, "rounds_ms": rounds_ms, **common, "repeats": repeats}


def time_zoo(args) -> None:
    cards = {n: zoo.card(n) for n in zoo.names()}
    figures = time_side_by_side(list(cards), args.peers, args.threads, args.repeats, args.rounds)
    for name, card in cards.items():
        card["speed"] = figures["students"][name]
        write_card(zoo.ZOO_DIR / name, card)
        print(zoo.describe(name))
    out = ROOT / "metrics/zoo_speed.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


def render_table() -> str:
    rows = [
        "| student | params | Set5 fp32 / INT8 | Manga109 fp32 / INT8 | valid fp32 / INT8 | INT8 ms | fp32 ms "
        "| x FSRCNN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpus = set()
    for name in zoo.names():
        c = zoo.card(name)
        q, s = c["quality"], c.get("speed") or {}
        cells = [
            f"{f(q.get(k, {}).get('psnr_fp32'))} / {f(q.get(k, {}).get('psnr_int8'))}"
            for k in ("Set5", "Manga109", "valid")
        ]
        a = c["arch"]
        rows.append(
            f"| `zoo:{name}` (rep {a['channels']} x {a['blocks']}) | {c['params']:,} | {' | '.join(cells)} "
            f"| {f(s.get('int8_ms'), 1)} | {f(s.get('fp32_ms'), 1)} | {f(s.get('x_faster_than_fsrcnn'))} |"
        )
        if s:
            cpus.add(f"{s['cpu']}, {s['threads']} threads; FSRCNN (OpenCV) {f(s.get('fsrcnn_ms'), 1)} ms")
    rows += [
        "",
        "PSNR in dB on Y, border 4 cropped; ms per 1080p output frame (ONNX Runtime, one run, interleaved "
        f"with OpenCV's FSRCNN): {'; '.join(sorted(cpus)) or 'not timed'}. Written by "
        "`python scripts/zoo_release.py table` from src/sharpkd/deploy/zoo/*/card.json.",
    ]
    return "\n".join(rows)


def table(args) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from results_table import replace_block

    doc = args.doc
    doc.write_text(replace_block(doc.read_text(), render_table(), "zoo"))
    print(f"wrote the zoo block of {doc}")


def render_adapt(checkout: Path) -> str:
    """The last `sharpkd adapt` run of `checkout` (metrics/adapt.json, eval.json, export.json) against the
    zoo student it started from, on the sets both were evaluated on."""
    record = _json(checkout / "metrics/adapt.json")
    evaluation, export = _json(checkout / "metrics/eval.json"), _json(checkout / "metrics/export.json")
    adapted = quality(evaluation, export)
    start = zoo.card(zoo.name_of(record["from"]))["quality"]

    rows = [
        "| set | zoo student fp32 / INT8 | adapted fp32 / INT8 | change fp32 / INT8 |",
        "|---|---|---|---|",
    ]
    # "valid" is each run's own split of its training folder: not the same images in the two runs.
    for name in (n for n in adapted if n in start and n != "valid"):
        a, z = adapted[name], start[name]
        changes = [None if a[k] is None or z[k] is None else a[k] - z[k] for k in ("psnr_fp32", "psnr_int8")]
        rows.append(
            f"| {name} | {f(z['psnr_fp32'])} / {f(z['psnr_int8'])} | {f(a['psnr_fp32'])} / {f(a['psnr_int8'])} "
            f"| {' / '.join('n/a' if c is None else f'{c:+.2f}' for c in changes)} dB |"
        )
    train = _json(checkout / "metrics/train.json")
    rows += [
        "",
        f"`{record['experiment']}`: {record['from']} adapted to {Path(record['folder']).name} in "
        f"{record['minutes']:.1f} minutes of wall time, every stage included (the teacher's labelling, "
        f"{train.get('steps')} fine-tuning steps, evaluation, export), on {_cpu()} (its command: docs/zoo.md). "
        "Written by `python scripts/zoo_release.py adapt-table` from metrics/adapt.json, eval.json, export.json "
        "and the zoo card.",
    ]
    return "\n".join(rows)


def _cpu() -> str:
    from sharpkd.deploy.timing import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores"


def adapt_table(args) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from results_table import replace_block

    args.doc.write_text(replace_block(args.doc.read_text(), render_adapt(args.checkout.resolve()), "adapt"))
    print(f"wrote the adapt block of {args.doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="a finished zoo arm -> src/sharpkd/deploy/zoo/NAME/")
    p.add_argument("name")
    p.add_argument("--title", required=True)
    p.add_argument("--order", type=int, default=99)
    p.add_argument("--checkout", type=Path, default=Path("."))
    p.add_argument("--experiment", default="")
    p.set_defaults(run=publish)
    t = sub.add_parser("time", help="time the zoo beside FSRCNN, one run")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--repeats", type=int, default=10)
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "peers")
    t.set_defaults(run=time_zoo)
    b = sub.add_parser("table", help="the zoo block of docs/results.md")
    b.add_argument("--doc", type=Path, default=ROOT / "docs/results.md")
    b.set_defaults(run=table)
    d = sub.add_parser("adapt-table", help="the adapt block of docs/results.md, from the last adapt run")
    d.add_argument("--checkout", type=Path, default=Path("."))
    d.add_argument("--doc", type=Path, default=ROOT / "docs/results.md")
    d.set_defaults(run=adapt_table)
    args = ap.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
