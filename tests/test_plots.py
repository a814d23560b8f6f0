"""What `dvc plots show` draws (issue: a validation curve of spikes to 0, a noisy loss, an unlabelled scatter
from 0) and the quality-vs-speed PNG's published lines.

The DVC test renders the plots of this repository's dvc.yaml (and its .dvc/plots template) with the real
DVC, in a tiny git + DVC repository holding only the files they read, written by the code the stages use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import REPO
from sharpkd.evaluation import quality_speed_table
from sharpkd.report import PUBLISHED_X4, published_sets, save_quality_speed_plot
from sharpkd.train import interval_curve, write_curves

EVAL_STEPS = [4, 8, 12]


def fit_curve() -> list[dict]:
    """A FitResult.curve of 12 steps validated every 4 (train.fit's rows: val_* only where it validated)."""
    rows = []
    for step in range(1, 13):
        row = {"step": step, "loss": 1.0 / step, "pixel": 0.5 / step, "lr": 1e-3 * step}
        if step in EVAL_STEPS:
            row |= {"val_psnr": 20.0 + step / 4, "val_ssim": 0.7}
        rows.append(row)
    return rows


def test_interval_curve_has_a_row_per_validation_with_the_mean_loss_since_the_last():
    rows = interval_curve(fit_curve())
    assert [r["step"] for r in rows] == EVAL_STEPS
    assert rows[0]["loss"] == pytest.approx(sum(1.0 / s for s in range(1, 5)) / 4)
    assert rows[1]["pixel"] == pytest.approx(sum(0.5 / s for s in range(5, 9)) / 4)
    assert [r["lr"] for r in rows] == pytest.approx([4e-3, 8e-3, 12e-3])  # at the validation's step
    assert all(r["val_psnr"] > 20 and r["val_ssim"] == 0.7 for r in rows)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """`dvc plots show --json` of this repository's plots, on a curve and a quality_speed.csv written as the
    distill and evaluate stages write them: {plot id: (vega spec, its data points)}."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path_factory.mktemp("plots")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert _dvc(repo, "init", "-q").returncode == 0
    _dvc(repo, "config", "core.check_update", "false")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / ".dvc" / "plots", repo / ".dvc" / "plots")
    write_curves(fit_curve(), repo / "metrics/train_curve.tsv", repo / "metrics/train_steps.tsv")
    rows = [
        {"set": "valid", "method": "bicubic", "psnr": 25.1, "ssim": 0.70, "ms_1080p": 3.2},
        {"set": "valid", "method": "teacher", "psnr": 27.5, "ssim": 0.80, "ms_1080p": None},  # not timed
        {"set": "valid", "method": "student", "psnr": 27.0, "ssim": 0.79, "ms_1080p": 60.5},
    ]
    quality_speed_table(rows).to_csv(repo / "metrics/quality_speed.csv", index=False)  # as evaluate writes it
    proc = _dvc(repo, "plots", "show", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    out = {}
    for plot_id, renders in shown["data"].items():
        (render,) = renders
        assert render["type"] == "vega", plot_id
        out[plot_id] = (render["content"], render["content"]["data"]["values"])
    return out


def test_validation_curve_has_points_only_where_it_was_measured(rendered):
    spec, points = rendered["validation PSNR"]
    assert spec["encoding"]["x"]["field"] == "step"
    # Empty strings are what DVC hands the template for empty cells (drawn as 0): there must be none.
    assert [int(p["step"]) for p in points] == EVAL_STEPS
    assert all(p["val_psnr"] != "" and float(p["val_psnr"]) > 0 for p in points)
    assert [float(p["val_psnr"]) for p in points] == [21.0, 22.0, 23.0]


def test_loss_curve_is_the_mean_per_validation_interval(rendered):
    spec, points = rendered["metrics/train_curve.tsv"]
    assert "mean" in spec["title"]["text"]
    want = [r["loss"] for r in interval_curve(fit_curve())]
    assert [float(p["loss"]) for p in points] == pytest.approx(want, rel=1e-5)
    assert all(v != "" for p in points for v in p.values())


def test_quality_speed_scatter_is_labelled_with_honest_axes(rendered):
    spec, points = rendered["metrics/quality_speed.csv"]
    enc = spec["encoding"]
    assert enc["y"]["scale"] == {"zero": False} and enc["y"]["title"].startswith("PSNR (dB")
    assert enc["x"]["scale"] == {"type": "log"} and enc["x"]["title"].startswith("ms per 1080p frame")
    text = [layer for layer in spec["layer"] if layer["mark"]["type"] == "text"]
    assert text and text[0]["encoding"]["text"]["field"] == "label"
    assert any("datum.method" in t.get("calculate", "") for t in spec["transform"])
    # The untimed teacher's empty ms_1080p is filtered out, not drawn at 0 (or at -inf on the log axis).
    assert any("isFinite(toNumber(datum['ms_1080p']))" in t.get("filter", "") for t in spec["transform"])
    assert {p["method"] for p in points} == {"bicubic", "teacher", "student"}


def test_dvc_plots_html_is_not_committed():
    assert "/dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()


def test_plot_files_are_stage_outputs():
    """train_steps.tsv is an output of distill (not a plot); the plots name only files a stage writes."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    distill = spec["stages"]["distill"]
    assert "metrics/train_steps.tsv" in distill["outs"]
    assert [next(iter(p)) for p in distill["plots"]] == ["metrics/train_curve.tsv"]


# ------------------------------------------------------------------ quality_speed.png's published lines


@pytest.mark.parametrize(
    ("sets", "scale", "drawn", "note"),
    [
        (["valid"], 4, [], "not drawn, as neither set was evaluated"),
        (["valid", "Set5"], 4, ["Set5"], None),
        (["valid", "set14", "Set5"], 4, ["Set5", "Set14"], None),
        (["valid", "Set5"], 2, [], "data.scale is 2"),
    ],
)
def test_published_lines_only_for_the_sets_measured(sets, scale, drawn, note):
    got, why = published_sets(sets, scale)
    assert got == drawn
    assert (why is None) if note is None else (note in why)


def test_quality_speed_png_without_set5_draws_no_published_line(tmp_path, monkeypatch):
    import matplotlib.axes

    lines = []
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axhline", lambda ax, y=0, *a, **k: lines.append(y) or real(ax, y, *a, **k)
    )
    table = pd.DataFrame(
        [
            {"set": "valid", "method": m, "psnr": p, "ssim": 0.8, "ms_1080p": ms}
            for m, p, ms in (("bicubic", 25.0, 3.0), ("teacher", 27.0, 900.0), ("student", 26.5, 60.0))
        ]
    )
    save_quality_speed_plot(tmp_path / "a.png", table, 4, [])
    assert lines == [] and (tmp_path / "a.png").stat().st_size > 0
    with_set5 = pd.concat([table, table.assign(set="Set5")])
    save_quality_speed_plot(tmp_path / "b.png", with_set5, 4, [])
    assert sorted(lines) == sorted(psnr for psnr, _ in PUBLISHED_X4["Set5"].values())
