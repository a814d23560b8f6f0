"""A README results table, from the metrics/eval.json of DVC experiments (never typed by hand).

Usage: python scripts/results_table.py NAME=LABEL [NAME=LABEL ...] [--profile profiles/X.yaml] [--doc docs/results.md] [--block results]

Each NAME is a DVC experiment (an arm: e.g. ref-baseline, ref-distill, ref-upcycle from `make reference`),
LABEL what the row calls it. Rows: bicubic, each distinct teacher, then the student of every arm; columns:
PSNR / SSIM / LPIPS (null -> n/a) per evaluated set (extra sets such as Set5 or Manga109 first, the
validation split last; an arm without a set shows n/a), parameters, ms per 1080p frame (eval.json's
`speed.<method>.<runtime>_<device>.1080p.ms`). Below the
table: each arm's student PSNR against the first arm's, training time, and the command that made each
arm (the `-S` values all arms share, then each arm's own, both against the workspace's params.yaml).
With --doc, the table replaces what stands between `<!-- BLOCK:start -->` and `<!-- BLOCK:end -->`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml


def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:start -->", f"<!-- {block}:end -->"


def experiment_rows(names: list[str]) -> dict[str, dict]:
    """name -> {column: value} (metrics and params, file prefixes dropped) for each named experiment."""
    import dvc.api

    rows = dvc.api.exp_show(num=-1)
    found: dict[str, dict] = {}
    for row in rows:
        name = row.get("Experiment")
        if name in names and name not in found:
            found[name] = columns(row)
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"error: no DVC experiment named {', '.join(missing)} (see `dvc exp show`)")
    return found


def columns(row: dict) -> dict:
    """An exp_show row with the file prefixes dropped. exp_show prefixes a column with its file only when two
    files share the key (eval.json and export.json both time the student in torch on the CPU, say): then
    eval.json's value is the one kept."""
    out: dict = {}
    for key, value in row.items():
        file, sep, name = key.partition(":")
        name = name if sep else file
        if name not in out or file.endswith("eval.json"):
            out[name] = value
    return out


def ms_1080p(m: dict, method: str):
    """A method's ms per 1080p frame as evaluate timed it (sharpkd.evaluation.speed_name: on timing.device)."""
    from sharpkd.deploy.timing import speed_key
    from sharpkd.evaluation import speed_name

    device = str(m.get("timing.device") or "cpu").split(":")[0]
    return m.get(speed_key(speed_name(method, device)))


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(value, digits: int) -> str:
    if value is None or value == "" or value == "-":
        return "n/a"
    return f"{float(value):.{digits}f}"


def _num(value) -> float | None:
    try:
        return None if value in (None, "", "-") else float(value)
    except (TypeError, ValueError):
        return None


def sets_of(arms: list[dict]) -> list[str]:
    """Evaluated sets of any arm, extra sets first (Manga109, Set5, ...), then the validation split."""
    sets = {k.split(".")[0] for m in arms for k in m if re.fullmatch(r"[^.]+\.student\.psnr", k)}
    return sorted(sets - {"valid"}) + (["valid"] if "valid" in sets else [])


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    text = str(v)
    return f"'{text}'" if any(c in text for c in " []{}:,") else text


def _normalize(v):
    """One form for a param value: exp_show gives a column float (24000.0) or text ('[70, 95]', 'True')
    when some of its rows lack the param."""
    if isinstance(v, str):
        try:
            v = yaml.safe_load(v)
        except yaml.YAMLError:
            return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list | tuple):
        return [_normalize(x) for x in v]
    return v


def param_changes(metrics: dict, defaults: dict) -> dict[str, str]:
    """`-S` arguments (key -> 'key=value' text) that turn the workspace's params.yaml into this arm's."""
    changes = {}
    for key, default in defaults.items():
        if key not in metrics:
            continue
        value, default = _normalize(metrics[key]), _normalize(default)
        if isinstance(default, list | tuple) and isinstance(value, list | tuple):
            same = list(value) == list(default)
        else:
            same = value == default
        if not same:
            changes[key] = f"{key}={_value(value)}"
    for key, value in metrics.items():  # keys params.yaml lacks, e.g. eval.sets.Set5 (added with ++)
        if key.startswith("eval.sets.") and key not in defaults and value not in (None, ""):
            changes[key] = f"++{key}={_value(value)}"
    return changes


def build_table(arms: list[tuple[str, str, dict]], defaults: dict | None = None) -> str:
    """arms: (experiment name, label, its columns); the first arm is the one the others are compared with."""
    metrics = [m for _, _, m in arms]
    sets = sets_of(metrics)
    first = metrics[0]
    # A row per distinct teacher (the arms of the teachers profile learn from different ones).
    teachers: dict[str, dict] = {}
    for m in metrics:
        if any(_num(m.get(f"{s}.teacher.psnr")) for s in sets):
            teachers.setdefault(m.get("teacher.architecture") or "teacher", m)
    rows = [
        ("bicubic (the degraded input)", first, "bicubic"),
        *((f"teacher ({name})", m, "teacher") for name, m in (teachers or {"teacher": first}).items()),
        *((f"student, {label} (`{name}`)", m, "student") for name, label, m in arms),
    ]
    header = ["method"] + [f"{s} PSNR / SSIM / LPIPS" for s in sets] + ["params", "ms / 1080p frame"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m, method in rows:
        cells = [
            f"{_fmt(m.get(f'{s}.{method}.psnr'), 2)} / {_fmt(m.get(f'{s}.{method}.ssim'), 4)} / "
            f"{_fmt(m.get(f'{s}.{method}.lpips'), 3)}"
            for s in sets
        ]
        params = _num(m.get(f"{method}.params"))
        cells += [f"{int(params):,}" if params is not None else "", _fmt(ms_1080p(m, method), 0)]
        lines.append("| " + " | ".join([label, *cells]) + " |")

    base_name = arms[0][0]
    lines.append("")
    if len(arms) > 1:
        # Against a no-teacher first arm, a gain is also given as its share of the arm's teacher's lead.
        untaught = str(first.get("distill.teacher")).lower() == "false"
        share_of = " (in brackets: the share of the arm's teacher's lead over it)" if untaught else ""
        lines.append(f"Student PSNR against `{base_name}`{share_of}:")
        lines.append("")
        for name, _, m in arms[1:]:
            gains = []
            for s in sets:
                a, b = _num(m.get(f"{s}.student.psnr")), _num(first.get(f"{s}.student.psnr"))
                t = _num(m.get(f"{s}.teacher.psnr"))
                if a is None or b is None:
                    gains.append(f"n/a on {s}")
                    continue
                share = f" ({(a - b) / (t - b):.0%})" if untaught and t is not None and t > b else ""
                gains.append(f"{a - b:+.2f} dB{share} on {s}")
            lines.append(f"- `{name}`: {', '.join(gains)}")
        lines.append("")
    times = [(name, _num(m.get("seconds")), _num(m.get("steps"))) for name, _, m in arms]
    if all(t is not None and n is not None for _, t, n in times):
        spent = ", ".join(f"{t / 60:.0f} min (`{name}`)" for name, t, _ in times)
        steps = {int(n) for _, _, n in times}
        each = f"{steps.pop():,} steps each" if len(steps) == 1 else "steps differ"
        lines.append(f"Training time: {spent}; {each}.")
        lines.append("")
    if defaults is not None:
        changes = [param_changes(m, defaults) for m in metrics]
        common = [v for k, v in changes[0].items() if all(c.get(k) == v for c in changes[1:])]
        lines.append("Made by `dvc exp run --queue -n NAME` with, for every arm:")
        lines.append("")
        lines.append(
            "`" + " ".join(f"-S {c}" for c in common) + "`" if common else "(nothing but params.yaml)"
        )
        lines.append("")
        lines.append("and for each arm:")
        lines.append("")
        for (name, _, _), change in zip(arms, changes, strict=True):
            own = [v for v in change.values() if v not in common]
            lines.append(f"- `{name}`: " + (" ".join(f"`-S {c}`" for c in own) if own else "nothing more"))
        lines.append("")
    device = first.get("timing.device") or "?"
    threads = _num(first.get("timing.torch_threads"))
    threads = int(threads) if threads is not None else "?"
    lines.append(
        f"PSNR/SSIM: Y channel, border of `data.scale` cropped (pyiqa); ms on {device}, {threads} torch threads."
    )
    return "\n".join(lines)


def replace_block(text: str, table: str, block: str = "results") -> str:
    start, end = markers(block)
    if start not in text or end not in text:
        raise SystemExit(f"error: README has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def parse_arm(spec: str) -> tuple[str, str]:
    name, _, label = spec.partition("=")
    if not name:
        raise SystemExit(f"error: {spec!r}: give NAME=LABEL")
    return name, label or name


def profile_arms(path: Path) -> list[tuple[str, str]]:
    """(name, label) of the arms a profile's table compares (its `table`, else its own arms)."""
    from sharpkd.profiles import load_profile

    profile = load_profile(path)
    if profile.table:
        return [(name, label or name) for name, label in profile.table.items()]
    return [(a.name, a.label) for a in profile.arms]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="*", metavar="NAME=LABEL", help="DVC experiment and its row label")
    ap.add_argument(
        "--profile", type=Path, help="take the arms from this profile's `table` (else its arms) and labels"
    )
    ap.add_argument("--doc", type=Path, help="write the table into this file between the markers")
    ap.add_argument(
        "--block", default="results", help="marker name: <!-- BLOCK:start --> ... <!-- BLOCK:end -->"
    )
    ap.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="the defaults the commands start from"
    )
    args = ap.parse_args()
    arms = [parse_arm(a) for a in args.arms] + (profile_arms(args.profile) if args.profile else [])
    if not arms:
        ap.error("name the arms (NAME=LABEL) or a --profile")
    found = experiment_rows([n for n, _ in arms])
    defaults = flat(yaml.safe_load(args.params.read_text())) if args.params.is_file() else None
    table = build_table([(n, label, found[n]) for n, label in arms], defaults)
    print(table)
    if args.doc:
        from sharpkd.files import write_text

        write_text(args.doc, replace_block(args.doc.read_text(), table, args.block))
        print(f"wrote the table into {args.doc} ({args.block} block)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
