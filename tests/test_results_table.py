"""scripts/results_table.py: a row per arm, gains against the first arm, the command of each arm."""

from __future__ import annotations

import importlib.util

import pytest

from helpers import REPO, repo_params_dict


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("results_table", REPO / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arm(student: float, manga: float | None = None, **params) -> dict:
    m = {
        "Set5.bicubic.psnr": 28.43,
        "Set5.bicubic.ssim": 0.81,
        "Set5.bicubic.lpips": None,
        "Set5.teacher.psnr": 32.14,
        "Set5.teacher.ssim": 0.89,
        "Set5.student.psnr": student,
        "Set5.student.ssim": 0.87,
        "Set5.student.lpips": None,
        "valid.student.psnr": student - 3,
        "valid.student.ssim": 0.75,
        "valid.teacher.psnr": 28.4,
        "teacher.architecture": "PAN",
        "teacher.params": 272419,
        "student.params": 64720,
        "speed.student.torch_cpu.1080p.ms": 220.4,
        "speed.bicubic.resize_cpu.1080p.ms": 9.6,
        "seconds": 3000.0,
        "steps": 24000,
        "timing.device": "cpu: AMD EPYC",
        "timing.torch_threads": 1,
        "data.source": "folder",
        "data.teacher_only.upcycle": [],
        "distill.teacher": True,
        "distill.steps": 24000,
        "eval.sets.Set5": "/shared/testsets/Set5/HR",
    }
    if manga is not None:
        m |= {"Manga109.student.psnr": manga, "Manga109.student.ssim": 0.8, "Manga109.bicubic.psnr": 24.0}
    return m | params


def test_a_row_per_arm_and_gains_against_the_first(table):
    arms = [
        ("ref-baseline", "HR only", _arm(30.96, **{"distill.teacher": False})),
        ("ref-distill", "distilled", _arm(31.02)),
        (
            "ref-upcycle",
            "distilled + upcycled",
            _arm(31.20, manga=25.5, **{"data.teacher_only.upcycle": ["zoom_in", "zoom_out"]}),
        ),
    ]
    defaults = table.flat(repo_params_dict())
    text = table.build_table(arms, defaults)
    lines = text.splitlines()
    header = lines[0]
    # Manga109 appears when any arm has it; extra sets first, the validation split last.
    assert header.index("Manga109") < header.index("Set5") < header.index("valid")
    rows = [line for line in lines if line.startswith("| student")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "student, HR only (`ref-baseline`)",
        "student, distilled (`ref-distill`)",
        "student, distilled + upcycled (`ref-upcycle`)",
    ]
    assert "n/a / n/a / n/a" in rows[0] and "25.50 / 0.8000 / n/a" in rows[2]  # no Manga109 in the first arm
    # ms per 1080p frame: each method's figure of eval.json, timed on timing.device
    assert rows[0].endswith("| 64,720 | 220 |") and "| 10 |" in next(
        x for x in lines if x.startswith("| bicubic")
    )
    assert "| teacher (PAN) | n/a / n/a / n/a | 32.14 / 0.8900 / n/a" in text
    # Against a no-teacher first arm: the gain's share of the teacher's lead, (31.02 - 30.96) / (32.14 - 30.96)
    assert "Student PSNR against `ref-baseline` (in brackets: the share of the arm's teacher's lead" in text
    assert "- `ref-distill`: n/a on Manga109, +0.06 dB (5%) on Set5, +0.06 dB (14%) on valid" in text
    assert "- `ref-upcycle`: n/a on Manga109, +0.24 dB (20%) on Set5" in text
    assert (
        "Training time: 50 min (`ref-baseline`), 50 min (`ref-distill`), 50 min (`ref-upcycle`); 24,000 steps"
        in text
    )
    # The commands: what every arm shares, then each arm's own -S values.
    common = text.split("for every arm:")[1].split("and for each arm:")[0]
    assert "-S data.source=folder" in common and "-S distill.steps=24000" in common
    assert "-S ++eval.sets.Set5=/shared/testsets/Set5/HR" in common
    assert "- `ref-baseline`: `-S distill.teacher=false`" in text
    assert "- `ref-distill`: nothing more" in text
    assert "- `ref-upcycle`: `-S data.teacher_only.upcycle=[zoom_in,zoom_out]`" in text
    assert text.endswith("ms on cpu: AMD EPYC, 1 torch threads.")


def test_a_teacher_row_per_distinct_teacher(table):
    """The teachers profile's arms learn from different teachers: each gets its row, in the arms' order."""
    arms = [
        ("base", "no teacher", _arm(31.18, **{"distill.teacher": False})),
        ("dctlsa", "DCTLSA", _arm(31.37, **{"teacher.architecture": "DCTLSA", "Set5.teacher.psnr": 32.53})),
        (
            "dctlsa-2",
            "DCTLSA again",
            _arm(31.30, **{"teacher.architecture": "DCTLSA", "Set5.teacher.psnr": 32.53}),
        ),
        ("mix", "both", _arm(31.40, **{"teacher.architecture": "DCTLSA + PAN", "Set5.teacher.psnr": 32.60})),
    ]
    lines = [line for line in table.build_table(arms).splitlines() if line.startswith("| teacher")]
    assert [line.split("|")[1].strip() for line in lines] == [
        "teacher (PAN)",
        "teacher (DCTLSA)",
        "teacher (DCTLSA + PAN)",
    ]
    assert "| 32.60 / 0.8900 / n/a" in lines[2]


def test_no_share_of_the_lead_against_a_taught_first_arm(table):
    """A recipe table's control is distilled: its gains are plain differences."""
    text = table.build_table([("control", "PAN", _arm(31.09)), ("lever", "kd 2", _arm(31.07))])
    assert "Student PSNR against `control`:" in text
    assert "- `lever`: -0.02 dB on Set5, -0.02 dB on valid" in text


def test_columns_prefer_eval_json_where_files_share_a_key(table):
    """eval.json and export.json both time the student in torch on the CPU: the table shows evaluate's."""
    for order in (1, -1):
        row = dict(
            list(
                {
                    "Experiment": "ref-distill",
                    "metrics/eval.json:speed.student.torch_cpu.1080p.ms": 40.0,
                    "metrics/export.json:speed.student.torch_cpu.1080p.ms": 50.0,
                    "speed.student.onnxruntime_cpu.1080p.ms": 30.0,
                    "timing.device": "cpu: AMD EPYC",
                }.items()
            )[::order]
        )
        cols = table.columns(row)
        assert cols["speed.student.torch_cpu.1080p.ms"] == 40.0 and cols["Experiment"] == "ref-distill"
        assert cols["speed.student.onnxruntime_cpu.1080p.ms"] == 30.0
        assert table.ms_1080p(cols, "student") == 40.0 and table.ms_1080p(cols, "teacher") is None
    assert (
        table.ms_1080p({"timing.device": "cuda: H200", "speed.student.torch_cuda.1080p.ms": 2.0}, "student")
        == 2.0
    )


def test_readme_block_replaced(table):
    text = "intro\n<!-- domain:start -->\nold\n<!-- domain:end -->\nrest\n"
    assert (
        table.replace_block(text, "NEW", "domain")
        == "intro\n<!-- domain:start -->\nNEW\n<!-- domain:end -->\nrest\n"
    )
    with pytest.raises(SystemExit, match="results:start"):
        table.replace_block(text, "NEW", "results")
    assert table.parse_arm("ref-distill=distilled, labelled") == ("ref-distill", "distilled, labelled")
    assert table.parse_arm("ref-distill") == ("ref-distill", "ref-distill")


def test_param_changes_read_exp_show_column_types(table):
    """exp_show gives a column float or text when some rows lack the param: not a change by itself."""
    defaults = {
        "distill.steps": 2000,
        "degradation.jpeg_quality": [70, 95],
        "distill.amp": True,
        "data.unlabeled": "",
    }
    shown = {
        "distill.steps": 24000.0,
        "degradation.jpeg_quality": "[70, 95]",
        "distill.amp": "True",
        "data.unlabeled": "",
    }
    assert table.param_changes(shown, defaults) == {"distill.steps": "distill.steps=24000"}


def test_arms_and_labels_come_from_the_profile(table):
    """`make results` / `make domain-results` name a profile: its `table`, else its own arms and labels."""
    domain = table.profile_arms(REPO / "profiles" / "domain.yaml")
    assert [n for n, _ in domain] == [
        "ref-baseline-rep64x5",
        "ref-distill-rep64x5",
        "dom-manga-rep64x5",
        "dom-manga-ema-f80-rep64x5",
    ]
    assert domain[0][1] == "photographs only, no teacher"
    reference = dict(table.profile_arms(REPO / "profiles" / "reference.yaml"))
    assert reference["ref-baseline-rep64x5"] == "HR only, no teacher" and len(reference) == 4
