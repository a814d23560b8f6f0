"""The export stage: ONNX (fp32, fp16) and TorchScript files, parity with PyTorch, speed, model card."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NullTracker, make_pairs, tiny_params
from sharpkd.errors import UserError
from sharpkd.models.student import Student, save_student
from sharpkd.onnx_export import export_onnx
from sharpkd.pipeline import StagePaths
from stages import export as export_stage


def trained_tiny_student(scale: int = 2) -> Student:
    """A tiny student after a few real optimisation steps (undo a blur), so the residual branch is not zero."""
    torch.manual_seed(0)
    model = Student(scale=scale, channels=8, blocks=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    blur = torch.ones(3, 1, 3, 3) / 9
    for _ in range(15):
        sharp = torch.rand(4, 3, 24, 24)
        soft = torch.nn.functional.conv2d(sharp, blur, padding=1, groups=3)
        loss = (model(soft) - sharp).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.tail.weight.abs().sum() > 0
    return model.eval()


class RecordingTracker:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


@pytest.fixture
def workspace(tmp_path):
    """What the export stage reads: the student, a validation image, teacher.json, the raw manifest, eval.json."""
    save_student(trained_tiny_student(), tmp_path / "models/student/student.pth")
    valid = tmp_path / "data/pairs/valid/input"
    valid.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(valid / "0001.png")
    (tmp_path / "models/teacher").mkdir(parents=True)
    (tmp_path / "models/teacher/teacher.json").write_text(
        json.dumps({"source": "train", "architecture": "EDSR-sharpkd", "scale": 2, "params": 12345})
    )
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/manifest.csv").write_text(
        "split,source,name,width,height,sha256,note\ntrain,samples,a,64,48,x,\nvalid,samples,b,80,60,y,\n"
    )
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(
        json.dumps(
            {
                "valid.bicubic.psnr": 25.0,
                "valid.student.psnr": 26.5,
                "valid.student.ssim": 0.8,
                "speedup": 9.0,
            }
        )
    )
    return tmp_path


def _export(ws, **export_params):
    params = tiny_params(data={"scale": 2}, export={"speed_repeats": 1, "int8": False, **export_params})
    tracker = RecordingTracker()
    metrics = export_stage.run(params, StagePaths.under(ws), tracker)
    return metrics, tracker


def test_export_writes_models_parity_speed_and_card(workspace):
    metrics, tracker = _export(workspace)
    out = workspace / "models/export"
    for name in ("student.onnx", "student_fp16.onnx", "student.pt", "model_card.md", "model_card.json"):
        assert (out / name).is_file(), name

    saved = json.loads((workspace / "metrics/export.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert all(not isinstance(v, dict) for v in saved.values()), "metrics/export.json must be flat"
    assert saved["parity.inputs"].startswith("0001.png")  # the real validation image is checked first
    assert saved["parity.onnx_fp32.max_abs"] <= 1e-4
    assert saved["parity.torchscript.max_abs"] <= 1e-4
    fp16 = saved["parity.onnx_fp16.max_abs"]
    assert (fp16 is not None and fp16 < 1e-2) or saved["parity.onnx_fp16.reason"]
    for name in ("torch_cpu", "torchscript_cpu", "onnxruntime_cpu"):
        assert saved[f"speed.student.{name}.1080p.ms"] > 0 and saved[f"speed.student.{name}.1080p.fps"] > 0
    assert saved["timing.torch_threads"] == torch.get_num_threads() and saved["timing.repeats"] == 1
    assert saved["speed.student.onnxruntime_cpu_int8.1080p.ms"] is None
    assert saved["speed.student.onnxruntime_cpu_int8.1080p.reason"] == "export.int8 is false"
    if saved["speed.student.onnxruntime_cuda.1080p.ms"] is None:
        assert "CUDA" in saved["speed.student.onnxruntime_cuda.1080p.reason"]
    assert not [k for k in saved if "ms_1080p" in k]  # every speed figure under the one key scheme

    card = json.loads((out / "model_card.json").read_text())
    assert card["architecture"]["scale"] == 2 and card["params"] == saved["params"]
    assert card["macs_1080p"] > 0
    assert card["teacher"]["architecture"] == "EDSR-sharpkd"
    assert card["data"]["images"] == {"train": 1, "valid": 1}
    assert card["params_used"]["export.speed_repeats"] == 1
    assert card["evaluation"]["valid.student.psnr"] == 26.5
    md = (out / "model_card.md").read_text()
    assert (
        card["speed"]["speed.student.onnxruntime_cpu.1080p.ms"]
        == saved["speed.student.onnxruntime_cpu.1080p.ms"]
    )
    ort_row = f"| student | onnxruntime_cpu | {saved['speed.student.onnxruntime_cpu.1080p.ms']:.6g} |"
    for text in ("Intended use", "Limits", "EDSR-sharpkd", "| valid | student | 26.5 | 0.8 |", ort_row):
        assert text in md, text

    names = [c[0] for c in tracker.calls]
    assert {"log_metrics", "log_artifact", "log_onnx_model"} <= set(names)
    onnx_call = next(c for c in tracker.calls if c[0] == "log_onnx_model")
    assert onnx_call[1][0] == out / "student.onnx"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exported_onnx_and_torchscript_take_any_size(workspace):
    """Odd sizes and a batch: the internal replicate padding is symbolic in both graphs."""
    import onnxruntime as ort

    _export(workspace, fp16=False)
    out = workspace / "models/export"
    assert not (out / "student_fp16.onnx").exists()
    model = torch.load(workspace / "models/student/student.pth", weights_only=True)
    student = Student(**model["arch"])
    student.load_state_dict(model["state_dict"])
    student.eval()
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["sharpkd.scale"] == "2"
    scripted = torch.jit.load(str(out / "student.pt"))
    for shape in [(3, 3, 21, 17), (1, 3, 8, 9), (1, 3, 1, 1)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = student(x)
            ts = scripted(x)
        onnx_out = session.run(None, {"input": x.numpy()})[0]
        assert onnx_out.shape == shape and np.abs(onnx_out - ref.numpy()).max() < 1e-5
        assert torch.allclose(ts, ref, atol=1e-6)


def test_parity_failure_writes_nothing(workspace, monkeypatch):
    monkeypatch.setattr(
        export_stage,
        "check_parity",
        lambda *a, **k: {"parity.onnx_fp32.max_abs": 0.5, "parity.torchscript.max_abs": 0.0},
    )
    with pytest.raises(UserError, match="onnx_fp32.*parity_tol"):
        _export(workspace)
    assert not (workspace / "models/export").exists()
    assert not (workspace / "metrics/export.json").exists()


def test_missing_student_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="student.pth.*dvc repro distill"):
        export_stage.run(tiny_params(), StagePaths.under(tmp_path), NullTracker())


def test_fp16_onnx_runs_close_to_fp32(tmp_path):
    import onnxruntime as ort

    student = trained_tiny_student(scale=3)
    path = export_onnx(student, tmp_path / "h.onnx", fp16=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float16)"
    x = torch.rand(1, 3, 31, 29)
    out = session.run(None, {"input": x.numpy().astype(np.float16)})[0]
    with torch.no_grad():
        assert np.abs(out.astype(np.float32) - student(x).numpy()).max() < 1e-2


def test_int8_model_is_calibrated_timed_and_scored(workspace):
    """export.int8: student_int8.onnx from training-input crops; its speed beside float32 and its quality cost."""
    from sharpkd.deploy.models import load_model

    make_pairs(workspace, tiny_params(data={"scale": 2}))  # real training inputs and validation images
    metrics, _ = _export(workspace, fp16=False, int8=True, int8_calibration=8)
    int8 = workspace / "models/export/student_int8.onnx"
    assert int8.is_file()
    assert metrics["int8.calibration_images"] == 8 and json.loads(metrics["int8.quantized_ops"])["Conv"] == 3
    # The tiny student barely differs from its input, so INT8 costs next to nothing here.
    assert metrics["int8.valid.psnr_fp32"] > 20 and abs(metrics["int8.valid.psnr_cost"]) < 0.2
    assert metrics["speed.student.onnxruntime_cpu_int8.1080p.ms"] > 0 and metrics["int8.speedup"] > 0
    # What sharpkd sharpen runs: the INT8 file loads like any exported model and agrees with float32.
    x = torch.rand(1, 3, 37, 29).numpy()  # noise: further from the calibration crops than any photo
    fp32 = load_model(workspace / "models/export/student.onnx")
    assert np.abs(load_model(int8).apply(x, 64, 8) - fp32.apply(x, 64, 8)).mean() < 0.01


HOSTILE = "<img src=x onerror=alert(1)>.png"


def test_model_card_markdown_shows_names_and_params_as_text(tmp_path):
    """File names and params go into model_card.md as text: an eval set's problem naming
    `<img src=x onerror=alert(1)>.png` is no live tag, a newline starts no heading, `|` splits no cell."""
    from markdown_it import MarkdownIt

    from sharpkd.model_card import model_card

    problems = (
        f"eval.sets.odd: {HOSTILE}: cannot decode image; a|b.png: too small; x\n# pwned\r\n| c | d |.png; "
        "[click](javascript:alert(1)).png; ![p](http://127.0.0.1/p.png).png"
    )
    (tmp_path / "eval.json").write_text(
        json.dumps({"valid.student.psnr": 26.5, "odd|set.student.psnr": 20.0, "odd.problems": problems})
    )
    (tmp_path / "student.onnx").write_bytes(b"onnx")
    params = tiny_params(eval={"sets": {"odd": f"/sets/<b>bold</b>|\n## {HOSTILE}"}})
    _, md = model_card(
        trained_tiny_student(),
        params,
        {"student.onnx": tmp_path / "student.onnx"},
        {"timing.device": "cpu: <script>x</script>"},
        teacher_dir=tmp_path / "no_teacher\n# x",
        manifest=tmp_path / "none.csv",
        eval_path=tmp_path / "eval.json",
        student_json=tmp_path / "none.json",
    )
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[0].startswith("sharpkd student") and not [h for h in headings if "pwned" in h or "x" == h]
    assert not [t for t in tokens if t.type in ("html_block", "html_inline")]
    html = MarkdownIt("commonmark").enable("table").render(md)
    assert "<img" not in html and "<script" not in html and "<b>" not in html and "<a " not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    # Every row of every table has as many cells as its header.
    for table in html.split("<table>")[1:]:
        table = table.split("</table>")[0]
        header = len(re.findall(r"<th[ >]", table.split("</thead>")[0]))
        rows = table.partition("<tbody>")[2].split("</tr>")[:-1]
        assert header and all(len(re.findall(r"<td[ >]", row)) == header for row in rows), table
    # The problem's text survives whole in one cell, its newline shown as \n.
    assert "a|b.png: too small; x\\n# pwned\\r\\n| c | d |.png" in html
    assert "odd|set" in html and "[click](javascript:alert(1)).png" in html
    assert "jpeg_quality=[70, 95]" in md  # what cannot be live stays as it reads


def _card(tmp_path, params, metrics: dict, manifest_rows: str = ""):
    from sharpkd.model_card import model_card

    (tmp_path / "student.onnx").write_bytes(b"onnx")
    manifest = tmp_path / "manifest.csv"
    if manifest_rows:
        manifest.write_text("split,source,name,width,height,sha256,note\n" + manifest_rows)
    return model_card(
        trained_tiny_student(),
        params,
        {"student.onnx": tmp_path / "student.onnx"},
        metrics,
        teacher_dir=tmp_path,
        manifest=manifest,
        eval_path=tmp_path / "eval.json",
        student_json=tmp_path / "student.json",
    )


def test_model_card_says_the_quick_profiles_student_is_a_demo(tmp_path):
    """data.source samples: the card says, first thing, that the student is a demo on a few photos."""
    rows = "".join(f"train,samples,p{i},512,512,x,\n" for i in range(5)) + "valid,samples,v,512,512,y,\n"
    params = tiny_params(data={"scale": 2, "source": "samples"}, distill={"steps": 2000})
    card, md = _card(tmp_path, params, {}, rows)
    want = "Demo model: trained on 5 scikit-image sample photos (data.source samples, the quick profile's data) for 2,000 steps"
    assert card["demo"].startswith(want)
    title, _, first = md.split("\n")[:3]
    assert (
        title.startswith("# sharpkd student") and first.startswith(f"**{want}") and "docs/results.md" in first
    )
    # Other data: no such note.
    folder = tiny_params(
        data={"scale": 2, "source": "folder", "folder": {"train": str(tmp_path), "valid": ""}}
    )
    card, md = _card(tmp_path, folder, {}, rows)
    assert card["demo"] is None and "Demo model" not in md


def test_model_card_gives_the_int8_cost_per_set(tmp_path):
    metrics = {"int8.method": "static", "int8.calibration_images": 8}
    for name, fp32, int8 in (("valid", 27.5, 27.3), ("Set5", 30.1, 29.85)):
        metrics |= {f"int8.{name}.psnr_fp32": fp32, f"int8.{name}.psnr_int8": int8}
        metrics |= {f"int8.{name}.psnr_cost": round(fp32 - int8, 5), f"int8.{name}.ssim_cost": 0.002}
        metrics |= {f"int8.{name}.ssim_fp32": 0.8, f"int8.{name}.ssim_int8": 0.798}
    card, md = _card(tmp_path, tiny_params(data={"scale": 2}), metrics)
    assert card["int8_cost"]["Set5"]["psnr_cost"] == 0.25 and set(card["int8_cost"]) == {"valid", "Set5"}
    assert "## INT8 quality cost" in md
    assert "| valid | 27.5 | 27.3 | 0.2 | 0.002 |" in md and "| Set5 | 30.1 | 29.85 | 0.25 | 0.002 |" in md
    # export.int8 false: no INT8 figures, no section.
    card, md = _card(tmp_path, tiny_params(data={"scale": 2}), {})
    assert card["int8_cost"] == {} and "INT8 quality cost" not in md
