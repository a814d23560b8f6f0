"""The MLflow model registry: what export registers (aliases, the servable pyfunc + onnx model),
`--model models:/...` for `sharpkd sharpen` and `bench` (tracking/registry.py, runtime.resolve_model),
and `mlflow models serve` of a registered student against a real local server (sharpkd.deploy.serving)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from helpers import REPO, tiny_params
from sharpkd import tracking
from sharpkd.cli import app
from sharpkd.fetch import file_digest
from test_tracking import clean_env, free_port, stop, wait_http

NAME = "sharpkd-student"
TILE, OVERLAP = 64, 8  # the tiling the tiny students are registered with (infer.tile / infer.overlap)
runner = CliRunner()


@dataclass
class Project:
    root: Path
    uri: str  # the tracking store
    onnx: list[Path]  # the exported file of version 1, 2


def _register(root: Path, seed: int) -> Path:
    """Export a tiny student (its residual branch not zero) and register it, as the export stage does."""
    from sharpkd.models.student import Student
    from sharpkd.onnx_export import export_onnx

    torch.manual_seed(seed)
    student = Student(scale=2, channels=8, blocks=1).eval()
    torch.nn.init.normal_(student.tail.weight, std=0.1)
    (root / f"export{seed}").mkdir()
    onnx_path = export_onnx(student, root / f"export{seed}" / "student.onnx")
    with tracking.stage_run("export", tiny_params(tracking={"enabled": True})) as t:
        t.log_onnx_model(onnx_path, np.zeros((1, 3, 16, 16), np.float32), tiling=(TILE, OVERLAP))
    return onnx_path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (dvc.yaml) whose store holds two registered versions of the student."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("DVC_", "MLFLOW_")) or key == "RANK":
                mp.delenv(key)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("SHARPKD_MODELS_DIR", str(root / "cache"))
        # log_model goes through MLflow's fluent API, which keeps the URI in a module global.
        mp.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
        mp.chdir(root)
        files = [_register(root, seed) for seed in (0, 1)]
        yield Project(root, f"sqlite:///{root}/mlflow.db", files)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def photo(h: int = 70, w: int = 90, channels: int = 3) -> np.ndarray:
    """Larger than a tile (64): the tiled path with its blending runs."""
    rng = np.random.default_rng(h * w + channels)
    return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


def sharpen_cli(src: Path, dst: Path, model: str, tile: int = TILE, overlap: int = OVERLAP):
    argv = [
        "sharpen",
        str(src),
        "-o",
        str(dst),
        "--model",
        model,
        "--tile",
        str(tile),
        "--overlap",
        str(overlap),
    ]
    return runner.invoke(app, argv, env={"COLUMNS": "200"})


def test_export_registers_a_servable_student_with_aliases(project):
    client = MlflowClient(project.uri)
    model = client.get_registered_model(NAME)
    # champion: the first export, then moved only by hand; challenger: the newest export.
    assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "1", "challenger": "2"}
    for version, onnx_path in zip(("1", "2"), project.onnx, strict=True):
        mv = client.get_model_version(NAME, version)
        assert mv.tags["sharpkd.onnx_sha256"] == file_digest(onnx_path)
        assert mv.tags["git.commit"]
        assert client.get_run(mv.run_id).data.tags["sharpkd.registered_version"] == version
    local = Path(client.get_model_version_download_uri(NAME, "2").removeprefix("file://"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "sharpkd.deploy.serving"
    assert mlmodel["flavors"]["onnx"]["data"] == "data/student.onnx"
    assert (local / "data/student.onnx").read_bytes() == project.onnx[1].read_bytes()
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "binary", "name": "image", "required": False}  # our own check names a missing image (row 25)
    ]
    params = {p["name"]: p["default"] for p in json.loads(mlmodel["signature"]["params"])}
    assert params == {"tile": TILE, "overlap": OVERLAP}
    assert mlmodel["saved_input_example_info"]["type"] == "dataframe"


def test_models_uris_resolve_to_the_registered_file_and_reuse_the_cache(project, monkeypatch):
    import mlflow.artifacts

    from sharpkd.deploy.models import resolve_model

    v1, v2 = (p.read_bytes() for p in project.onnx)
    for uri, want in [
        ("models:/sharpkd-student/1", v1),
        ("models:/sharpkd-student@champion", v1),
        ("models:/sharpkd-student@challenger", v2),
        ("models:/sharpkd-student/latest", v2),
    ]:
        path, _ = resolve_model(uri)
        assert path.read_bytes() == want, uri
        assert path.parent.parent == project.root / "cache" / NAME

    fetched: list[str] = []
    real = mlflow.artifacts.download_artifacts

    def recording(*args, **kwargs):
        fetched.append(kwargs["artifact_uri"].rsplit("/", 1)[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", recording)
    cached, _ = resolve_model("models:/sharpkd-student/2")
    assert fetched == ["MLmodel"], "a cached file whose sha256 is the registered one is not fetched again"
    cached.write_bytes(b"truncated")
    assert resolve_model("models:/sharpkd-student/2")[0].read_bytes() == v2
    assert fetched[1:] == ["MLmodel", "student.onnx"]
    assert not [p for p in cached.parent.iterdir() if p.name != "student.onnx"], "no temporary files left"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/sharpkd-student/9", "'sharpkd-student' has versions 1, 2 and aliases @challenger -> 2"),
        ("models:/sharpkd-student@best", "not in the MLflow store sqlite:///"),
        ("models:/someone-else/1", "no registered model 'someone-else' (registered: sharpkd-student)"),
        ("models:/sharpkd-student", "not a registry model URI"),
    ],
)
def test_a_missing_name_version_or_alias_is_one_line_naming_uri_and_store(project, tmp_path, uri, message):
    src = tmp_path / "in.png"
    src.write_bytes(png(photo()))
    res = sharpen_cli(src, tmp_path / "out.png", uri)
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: {uri}") and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("store", ["missing sqlite", "unreachable server"])
def test_a_missing_or_unreachable_store_is_one_line_naming_it(project, tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)  # not a project: no dvc.yaml, no mlflow.db
    if store == "unreachable server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
        want = "cannot be reached"
    else:
        want = "does not exist"
    res = runner.invoke(app, ["bench", "--model", "models:/sharpkd-student/1", "--sizes", "32x32"])
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert line.startswith("error: models:/sharpkd-student/1: the MLflow store ") and want in line, line
    assert len(line.splitlines()) == 1
    assert not list(tmp_path.glob("*.db")), "a failed lookup creates no store"


def test_sharpen_and_bench_take_a_models_uri(project, tmp_path):
    src = tmp_path / "photo.png"
    src.write_bytes(png(photo()))
    res = sharpen_cli(src, tmp_path / "by_uri.png", "models:/sharpkd-student@champion")
    assert res.exit_code == 0, res.output
    assert sharpen_cli(src, tmp_path / "by_file.png", str(project.onnx[0])).exit_code == 0
    assert (tmp_path / "by_uri.png").read_bytes() == (tmp_path / "by_file.png").read_bytes()

    res = runner.invoke(
        app, ["bench", "--model", "models:/sharpkd-student/2", "--sizes", "32x32", "--repeats", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "onnxruntime" in res.output and str(project.root / "cache" / NAME / "2") in res.output


def test_the_registered_model_predicts_what_sharpen_writes(project, tmp_path, monkeypatch):
    """mlflow.pyfunc in this process: PNG (RGB, RGBA) and JPEG bytes in, as bytes or base64 text; the
    PNG `sharpkd sharpen` writes out; tile/overlap default to the registered tiling."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.uri)
    model = mlflow.pyfunc.load_model("models:/sharpkd-student@champion")
    inputs = {"rgb.png": png(photo()), "rgba.png": png(photo(channels=4)), "q.jpg": png(photo(), "JPEG")}
    expected = {}
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
        for tile, overlap in ((TILE, OVERLAP), (32, 4)):
            dst = tmp_path / f"{name}.{tile}.png"
            assert sharpen_cli(tmp_path / name, dst, str(project.onnx[0]), tile, overlap).exit_code == 0
            expected[name, tile] = dst.read_bytes()

    values = list(inputs.values())
    values[1] = base64.b64encode(values[1]).decode()  # base64 text is taken too
    out = model.predict(pd.DataFrame({"image": values}))
    assert list(out["image"]) == [expected[name, TILE] for name in inputs]
    assert Image.open(io.BytesIO(out["image"][1])).mode == "RGBA", "alpha kept"
    out = model.predict(pd.DataFrame({"image": values[:1]}), params={"tile": 32, "overlap": 4})
    assert out["image"][0] == expected["rgb.png", 32]
    with pytest.raises(MlflowException, match="image 0: not an image"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as res:
        return json.loads(res.read())


def test_mlflow_models_serve_sharpens_image_bytes(project, tmp_path):
    """`mlflow models serve -m models:/sharpkd-student/1 --env-manager local` on 127.0.0.1 (no pip, no
    internet): a PNG in (base64 in JSON), the PNG `sharpkd sharpen` writes for it out."""
    src = tmp_path / "photo.png"
    src.write_bytes(png(photo()))
    assert sharpen_cli(src, tmp_path / "sharp.png", "models:/sharpkd-student/1").exit_code == 0
    want = np.asarray(Image.open(tmp_path / "sharp.png"))
    assert np.abs(want.astype(int) - photo()).max() > 8, "the student changes the image"

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/sharpkd-student/1"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = clean_env(MLFLOW_TRACKING_URI=project.uri)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        print(f"server answered /ping after {time.monotonic() - started:.1f} s")
        b64 = base64.b64encode(src.read_bytes()).decode()
        url = f"http://127.0.0.1:{port}/invocations"
        for body in (
            {"dataframe_split": {"columns": ["image"], "data": [[b64]]}},
            {"dataframe_records": [{"image": b64}]},
            {"inputs": {"image": [b64]}},
        ):
            (reply,) = _post(url, body)["predictions"]
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["image"]))))
            assert got.shape == want.shape == (70, 90, 3), list(body)
            assert np.abs(got.astype(int) - want).max() <= 1, list(body)
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(url, {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}})
        assert bad.value.code == 400 and "not an image" in bad.value.read().decode()
    except BaseException:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-4000:])
        raise
    finally:
        stop(proc)
        log.close()


# --------------------------------------------------------------------------- issue 40 (hardening, round 4)


@pytest.mark.parametrize(
    "data", ["../../../../secret.txt", "{root}/secret.txt", "data/link.onnx", "file:///x"]
)
def test_row22_a_registered_onnx_path_outside_the_model_folder_is_refused(tmp_path, monkeypatch, data):
    """A version (no sha tag) whose MLmodel `flavors.onnx.data` leads out of its model folder: `../`, an
    absolute path, a link out, a URI. Nothing is read from outside or copied into the model cache."""
    from sharpkd.errors import UserError
    from sharpkd.tracking.registry import fetch_model
    from sharpkd.tracking.store import resolve_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SHARPKD_MODELS_DIR", str(tmp_path / "cache"))
    (tmp_path / "secret.txt").write_text("secret")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = client.create_run(exp)
    model = tmp_path / "model"
    (model / "data").mkdir(parents=True)
    (model / "MLmodel").write_text(
        yaml.safe_dump({"flavors": {"onnx": {"data": data.format(root=tmp_path)}}})
    )
    client.log_artifacts(run.info.run_id, str(model), "model")
    folder = Path(run.info.artifact_uri.removeprefix("file://")) / "model"
    assert folder.is_dir() and (tmp_path / "secret.txt").samefile(folder / "../../../../secret.txt")
    (folder / "data" / "link.onnx").symlink_to(tmp_path / "secret.txt")
    client.create_registered_model("evil")
    client.create_model_version("evil", f"{run.info.artifact_uri}/model", run.info.run_id)
    with pytest.raises(UserError) as err:
        fetch_model("models:/evil/1", resolve_store(None, tmp_path))
    assert "refused" in str(err.value) and "\n" not in str(err.value), err.value
    cached = (
        [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] if (tmp_path / "cache").exists() else []
    )
    assert cached == []
