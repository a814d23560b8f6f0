"""scripts/sweep_table.py: the Pareto front, the rows read from experiment metrics, the README block."""

from __future__ import annotations

import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import sweep_table  # noqa: E402


def test_pareto_keeps_what_nothing_beats():
    # (ms, psnr): b is slower and worse than a; c is slower but better; d ties a on both.
    assert sweep_table.pareto([(10, 31.0), (20, 30.0), (30, 31.5), (10, 31.0)]) == [True, False, True, True]


def test_rows_and_table_from_experiment_metrics(tmp_path):
    exps = {
        "sweep-rep-48x4": {
            "student.channels": 48, "student.blocks": 4, "student.block": "rep", "student.params": 120000,
            "Set5.student.psnr": 31.5, "int8.Set5.psnr_int8": 31.45, "precision": "bf16", "seconds": 2700.0,
            "distill.lr": 0.001, "distill.warmup_steps": 300,
        },
        "sweep-plain-32x4": {
            "student.channels": 32, "student.blocks": 4, "student.block": "plain", "student.params": 64720,
            "Set5.student.psnr": 31.0, "int8.Set5.psnr_int8": "-",
        },
    }  # fmt: skip
    fp32, int8 = "speed.student.onnxruntime_cpu.1080p.ms", "speed.student.onnxruntime_cpu_int8.1080p.ms"
    assert (sweep_table.ms_key("fp32"), sweep_table.ms_key("int8")) == (fp32, int8)
    speeds = {(48, 4): {fp32: 200.0, int8: 90.0}, (32, 4): {fp32: 110.0, int8: 60.0}}
    rows = sweep_table.build_rows(exps, speeds)
    assert [r["experiment"] for r in rows] == ["sweep-plain-32x4", "sweep-rep-48x4"]
    assert rows[0]["psnr_int8"] is None and rows[1]["ms_int8"] == 90.0
    table = sweep_table.render(rows, 2, "test cpu")
    assert (
        "| `sweep-rep-48x4` | rep | 48 x 4 | 120,000 | 31.50 / 31.45 | 200 / 90 | yes / yes | 0.001, 300, bf16, 45 |"
        in table
    )
    # Before train.json recorded precision every CPU run was fp32; a missing time is n/a, not 0.
    assert "31.00 / n/a" in table and "| n/a, n/a, fp32, n/a |" in table
    readme = "intro\n<!-- sweep:start -->\nold\n<!-- sweep:end -->\nrest\n"
    new = sweep_table.replace_block(readme, table)
    assert "old" not in new and new.startswith("intro\n") and new.endswith("rest\n") and table in new
    with pytest.raises(SystemExit, match="markers"):
        sweep_table.replace_block("no markers", table)


def test_speed_is_measured_for_real():
    figures = sweep_table.measure(scale=2, channels=8, blocks=1, threads=1, repeats=1)
    assert set(figures) == {
        f"speed.student.onnxruntime_cpu{p}.1080p.{f}" for p in ("", "_int8") for f in ("ms", "fps")
    }
    assert all(v > 0 for v in figures.values())


def test_int8_with_float32_image_io_is_timed_beside_it():
    figures = sweep_table.measure(scale=2, channels=8, blocks=1, threads=1, repeats=1, float_io=True)
    assert figures["int8_float_io_ms"] > 0
    rows = sweep_table.speed_only_rows([(8, 1)], {(8, 1): figures}, scale=2)
    assert rows[0]["ms_int8_float_io"] == figures["int8_float_io_ms"]
    table = sweep_table.render(rows, threads=1, cpu="test cpu")
    assert "INT8 ms, float32 image I/O" in table.splitlines()[0]
    assert table.splitlines()[2].endswith(f" {figures['int8_float_io_ms']:.0f} |")


def test_published_table_sets_our_students_beside_the_published_ones():
    from sharpkd.report import PUBLISHED_STUDENTS

    rows = [
        {"experiment": "speed-rep-48x5", "block": "rep", "size": (48, 5), "params": 145_488.0,
         "psnr_fp32": 31.41, "psnr_int8": 31.40, "ms_fp32": 190.0, "ms_int8": 55.4},
    ]  # fmt: skip
    table = sweep_table.render_published(rows)
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == 1 + len(PUBLISHED_STUDENTS)
    params = [int(line.split("|")[2].strip().replace(",", "")) for line in lines]
    assert params == sorted(params)  # by size
    ours = next(line for line in lines if "speed-rep-48x5" in line)
    assert "| 145,488 | 31.41 | 31.40 | 55 | this repository |" in ours
    assert "| PlainUSR-T | 60,100 | 31.20 | 30.65 | n/a |" in table


def test_blocks_are_found_by_name():
    doc = "a\n<!-- speed:start -->\nold\n<!-- speed:end -->\nb\n<!-- sweep:start -->\nkeep\n<!-- sweep:end -->\n"
    new = sweep_table.replace_block(doc, "NEW", "speed")
    assert "NEW" in new and "old" not in new and "keep" in new
    with pytest.raises(SystemExit, match="teachers:start"):
        sweep_table.replace_block(doc, "NEW", "teachers")


def test_speed_only_sizes_are_timed_beside_the_experiments_but_never_on_the_front():
    fp32, int8 = sweep_table.ms_key("fp32"), sweep_table.ms_key("int8")
    ops = {"QLinearConv": 30.0, "DepthToSpace": 10.0, "Add": 10.0}
    speeds = {(64, 5): {fp32: 400.0, int8: 110.0, "int8_ops": ops}, (32, 4): {fp32: 110.0, int8: 50.0}}
    exps = {
        "crop-128x18-rep64x5": {
            "student.channels": 64, "student.blocks": 5, "student.block": "rep", "student.params": 240048,
            "Set5.student.psnr": 31.5, "int8.Set5.psnr_int8": 31.49,
        },
    }  # fmt: skip
    rows = sweep_table.build_rows(exps, speeds) + sweep_table.speed_only_rows([(32, 4)], speeds, 4)
    assert rows[0]["outside_convs"] == pytest.approx(0.4) and rows[1]["outside_convs"] is None
    assert rows[1]["params"] == 64_720  # the 32 x 4 student's own count
    table = sweep_table.render(rows, 2, "test cpu")
    # The faster 32 x 4 has no quality, so it does not push the trained 64 x 5 off the front.
    assert (
        "| `crop-128x18-rep64x5` | rep | 64 x 5 | 240,048 | 31.50 / 31.49 | 400 / 110 | yes / yes |" in table
    )
    assert (
        "| (speed only) | plain | 32 x 4 | 64,720 | n/a / n/a | 110 / 50 |  /  | n/a, n/a, n/a, n/a | n/a |"
        in table
    )
    assert "| n/a, n/a, n/a, n/a | 40% |" not in table and "40% |" in table
    assert "(speed only)" not in sweep_table.render_published(rows)


def test_the_int8_graph_is_profiled_for_real():
    figures = sweep_table.measure(scale=2, channels=8, blocks=1, threads=1, repeats=1, profile_ops=True)
    ops = figures["int8_ops"]
    assert "QLinearConv" in ops or "Conv" in ops  # the convs, whichever form ONNX Runtime fused them into
    assert all(v >= 0 for v in ops.values()) and sum(ops.values()) > 0
    assert 0.0 < sweep_table.outside_convs(ops) < 1.0  # the quantise/rearrange ops around them take some


def test_bad_sizes_are_a_clear_error():
    import subprocess

    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sweep_table.py"), "--sizes", "64by5"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0 and "--sizes '64by5'" in result.stderr and "Traceback" not in result.stderr
