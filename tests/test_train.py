"""Student, losses, the training loop and the distill stage (issue 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import REPO, NullTracker, loss_params, make_teacher_cache, stage_paths, tiny_params
from sharpkd.errors import UserError
from sharpkd.losses import VGG19_FILE, DistillObjective
from sharpkd.models import count_params
from sharpkd.models.student import Student, conv_macs
from sharpkd.train import FitConfig, NonFiniteLossError, fit

torch.set_num_threads(1)


def test_student_default_size_and_cost():
    s = Student(scale=4, channels=32, blocks=4)
    assert 50_000 <= count_params(s) <= 100_000
    # One 3x3 conv stack on a 480x270 grid: params * positions, roughly.
    assert 5 < conv_macs(s) / 1e9 < 12


@pytest.mark.parametrize("size", [(1, 3, 37, 53), (2, 3, 64, 31), (1, 3, 5, 7)])
def test_student_any_size(size):
    s = Student(scale=4, channels=8, blocks=1)
    with torch.no_grad():
        out, feat = s.forward_with_features(torch.rand(size))
    assert out.shape == size
    assert feat.shape[-2:] == (-(-size[2] // 4), -(-size[3] // 4))


def test_student_starts_as_identity():
    x = torch.rand(1, 3, 20, 24)
    assert torch.equal(Student(scale=2, channels=8, blocks=1)(x), x)


def _batch(b=2, p=16, s=2, c=4):
    return {
        "input": torch.rand(b, 3, p, p),
        "hr": torch.rand(b, 3, p, p),
        "teacher": torch.rand(b, 3, p, p),
        "feat": torch.rand(b, c, p // s, p // s),
    }


def _vgg_dir(tmp_path: Path) -> Path:
    """A VGG19 file with random weights (only the layers up to relu3_4), so no download is needed."""
    from torchvision.models import vgg19

    feats = vgg19().features[:18]
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / VGG19_FILE)
    return tmp_path


@pytest.mark.parametrize("term", ["pixel", "kd", "perceptual", "feature", "feature_affinity"])
def test_each_loss_term_reaches_the_student(term, tmp_path):
    weights = {"pixel": 0.0, "kd": 0.0, "perceptual": 0.0, "feature": 0.0, "feature_affinity": 0.0, term: 1.0}
    student = Student(scale=2, channels=8, blocks=1)
    torch.nn.init.normal_(student.tail.weight, std=0.1)  # a zero tail would block gradients upstream
    obj = DistillObjective(
        student,
        loss_params(**weights),
        teacher_feat_channels=4,
        weights_dir=_vgg_dir(tmp_path) if term == "perceptual" else None,
    )
    total, terms = obj(_batch())
    assert set(terms) == {term} and total.item() > 0
    total.backward()
    assert student.head[0].weight.grad is not None and student.head[0].weight.grad.abs().sum() > 0
    if term == "feature":
        assert obj.projector.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", ["hr", "teacher"])
def test_teacher_only_crops_skip_the_terms_that_need_hr(target, tmp_path):
    """`labelled` 0 marks a crop with no HR: pixel (and perceptual against HR) ignore it, kd and features do not."""
    torch.manual_seed(0)
    student = Student(scale=2, channels=8, blocks=1)
    torch.nn.init.normal_(student.tail.weight, std=0.1)
    weights = {"pixel": 1.0, "kd": 1.0, "perceptual": 1.0, "feature": 1.0, "feature_affinity": 1.0}
    obj = DistillObjective(
        student,
        loss_params(**weights, perceptual_target=target),
        teacher_feat_channels=4,
        weights_dir=_vgg_dir(tmp_path),
    )
    batch = {**_batch(b=3), "labelled": torch.tensor([1.0, 1.0, 0.0])}
    _, terms = obj(batch)
    changed = {**batch, "hr": batch["hr"].clone()}
    changed["hr"][2] = torch.rand_like(changed["hr"][2])  # the teacher-only crop's (meaningless) HR
    _, again = obj(changed)
    for k in terms:
        assert torch.equal(terms[k], again[k]), k
    # The pixel term is the mean over the labelled crops only.
    out = student(batch["input"])
    assert torch.allclose(terms["pixel"], F.l1_loss(out[:2], batch["hr"][:2]), atol=1e-6)
    changed["teacher"] = batch["teacher"].clone()
    changed["teacher"][2] += 0.5  # ... while kd sees every crop
    assert not torch.equal(obj(changed)[1]["kd"], terms["kd"])
    # No labelled crop at all: the pixel term is 0, not NaN.
    _, none = obj({**batch, "labelled": torch.zeros(3)})
    assert none["pixel"] == 0 and torch.isfinite(torch.stack(list(none.values()))).all()


def test_feature_affinity_compares_structure_not_values():
    from sharpkd.losses import affinity, affinity_distance

    torch.manual_seed(0)
    f = torch.randn(2, 4, 6, 5)
    a = affinity(f)
    assert a.shape == (2, 30, 30) and torch.allclose(a.diagonal(dim1=1, dim2=2), torch.ones(2, 30), atol=1e-5)
    # Channel offsets (removed by centring) and a common scale (removed by the cosine) do not matter,
    # nor does the number of channels: the student's 8 and the teacher's 4 compare directly.
    assert torch.allclose(affinity(3 * f + torch.randn(1, 4, 1, 1)), a, atol=1e-5)
    assert torch.allclose(affinity(torch.cat([f, f], 1)), a, atol=1e-5)
    assert not torch.allclose(affinity(f.flip(-1)), a, atol=1e-3)
    # The loss is the mean squared difference of the affinity matrices, computed without them.
    student = torch.randn(2, 8, 6, 5, requires_grad=True)
    want = F.mse_loss(affinity(student), affinity(f))
    got = affinity_distance(student, f)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got, want)
    got.backward()
    assert student.grad.abs().sum() > 0
    assert affinity_distance(f, 2 * f + 1).abs() < 1e-6


def test_zero_weight_terms_load_nothing(monkeypatch):
    import torchvision.models

    def boom(*a, **k):
        raise AssertionError("VGG must not be built when loss.perceptual is 0")

    monkeypatch.setattr(torchvision.models, "vgg19", boom)
    obj = DistillObjective(
        Student(scale=2, channels=8, blocks=1), loss_params(pixel=1, kd=0, perceptual=0, feature=0)
    )
    assert obj.vgg is None and obj.projector is None
    assert obj.needed_keys() == ("input", "hr")


def test_missing_vgg_weights_message(tmp_path, monkeypatch):
    from sharpkd import fetch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # Offline by construction: a closed port on 127.0.0.1 stands for the unreachable download site.
    closed = {
        **fetch.PRETRAINED["vgg19"],
        "url": "http://127.0.0.1:9/download.pytorch.org/vgg19-dcbb9e9d.pth",
    }
    monkeypatch.setitem(fetch.PRETRAINED, "vgg19", closed)
    with pytest.raises(UserError) as err:
        DistillObjective(
            Student(scale=2, channels=8, blocks=1), loss_params(perceptual=0.1), weights_dir=tmp_path / "w"
        )
    msg = str(err.value)
    assert VGG19_FILE in msg and str(tmp_path / "w") in msg and "download.pytorch.org" in msg


def test_non_finite_loss_stops(tmp_path):
    student = Student(scale=2, channels=8, blocks=1)
    obj = DistillObjective(student, loss_params(pixel=1, kd=0))

    def batch_fn(step):
        b = _batch()
        b["hr"][0, 0, 0, 0] = float("nan") if step == 3 else 0.0
        return b

    with pytest.raises(NonFiniteLossError, match="step 3"):
        fit(
            obj,
            batch_fn,
            FitConfig(steps=6, lr=1e-3, checkpoint_every=1),
            checkpoint_path=tmp_path / "ckpt.pt",
        )


@pytest.mark.parametrize(
    ("amp", "cpu_flags", "precision"),
    [
        (True, {"avx512_bf16"}, "bf16"),
        (True, {"amx_bf16"}, "bf16"),
        (True, set(), "fp32"),
        (False, {"avx512_bf16"}, "fp32"),
    ],
)
def test_bf16_training_passes_only_where_the_cpu_computes_bf16(amp, cpu_flags, precision, monkeypatch):
    """compute.amp on a CPU: bf16 autocast for the training passes where the CPU has bf16 instructions
    (elsewhere oneDNN emulates it, slower than fp32); validation and the weights stay fp32."""
    import sharpkd.train as train

    monkeypatch.setattr(train, "_cpu_flags", lambda: frozenset(cpu_flags))
    student = Student(scale=2, channels=8, blocks=1)
    obj = DistillObjective(student, loss_params(pixel=1, kd=0))
    dtypes: list[torch.dtype] = []
    student.head[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    eval_dtypes: list[torch.dtype] = []

    def evaluate():
        before = len(dtypes)
        student(torch.rand(1, 3, 16, 16))
        eval_dtypes.extend(dtypes[before:])
        del dtypes[before:]
        return {"psnr": 0.0}

    result = fit(obj, lambda step: _batch(), FitConfig(steps=3, lr=1e-3, amp=amp), evaluate=evaluate)
    assert result.precision == precision
    assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert eval_dtypes == [torch.float32]
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_a_checkpoint_resumes_only_in_the_precision_it_began_in(tmp_path, monkeypatch, capsys):
    import sharpkd.train as train

    ckpt = tmp_path / "ckpt.pt"

    def run(cpu_flags):
        monkeypatch.setattr(train, "_cpu_flags", lambda: frozenset(cpu_flags))
        obj = DistillObjective(Student(scale=2, channels=8, blocks=1), loss_params(pixel=1, kd=0))
        return fit(
            obj, lambda step: _batch(), FitConfig(steps=2, lr=1e-3, checkpoint_every=1), checkpoint_path=ckpt
        )

    assert run(set()).resumed_from == 0  # fp32, finished
    assert run(set()).resumed_from == 2  # same arithmetic: resumed at its end
    capsys.readouterr()
    assert run({"avx512_bf16"}).resumed_from == 0  # bf16 now: trained again
    assert "from a different configuration" in capsys.readouterr().out


@pytest.mark.parametrize(("cpu_flags", "precision"), [({"avx512_bf16"}, "bf16"), (set(), "fp32")])
def test_training_benchmark_times_the_precision_training_uses(cpu_flags, precision, monkeypatch):
    import importlib.util

    import sharpkd.train as train

    spec = importlib.util.spec_from_file_location("bench_models", REPO / "scripts" / "bench_models.py")
    bench_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_models)
    student_training_speed = bench_models.student_training_speed

    monkeypatch.setattr(train, "_cpu_flags", lambda: frozenset(cpu_flags))
    result = student_training_speed(scale=2, channels=4, blocks=1, patch=16, batch_size=2, steps=1)
    assert result["precision"] == precision and result["steps_per_s"] > 0


def test_corrupt_checkpoint_is_set_aside_and_training_restarts(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"step": 1, "steps": 2}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:60])  # truncated, as a full disk or a copy cut short leaves it
    obj = DistillObjective(Student(scale=2, channels=8, blocks=1), loss_params(pixel=1, kd=0))
    result = fit(
        obj, lambda step: _batch(), FitConfig(steps=2, lr=1e-3, checkpoint_every=1), checkpoint_path=ckpt
    )
    assert result.resumed_from == 0 and result.steps == 2
    err = capsys.readouterr().err
    assert f"{ckpt} cannot be resumed (PytorchStreamReader failed" in err and "starts from step 0" in err
    assert (tmp_path / "ckpt.pt.unreadable").is_file()
    assert torch.load(ckpt, weights_only=True)["step"] == 2  # the new run's checkpoint


def test_train_state_round_trips_through_the_checkpoint(tmp_path):
    """TrainState.to_checkpoint, saved and loaded as a resume loads it, then from_checkpoint: the same
    state, and the weights, optimizer, scheduler and RNG where they were, under the keys resumes read."""
    from sharpkd.train import TrainState, lr_at

    cfg = FitConfig(steps=6, lr=1e-2, warmup_steps=2)

    def machinery(seed):
        torch.manual_seed(seed)
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
        return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)

    def train_step(net, opt, sched, x):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
        sched.step()

    net, opt, sched = machinery(0)
    for _ in range(2):
        train_step(net, opt, sched, torch.rand(4, 3))
    state = TrainState(
        step=2,
        curve=[
            {"step": 1, "loss": 0.5, "lr": 0.005},
            {"step": 2, "loss": 0.25, "lr": 0.01, "val_psnr": 20.0},
        ],
        best={"psnr": 20.0},
        best_step=2,
        best_state={k: v.clone() for k, v in net.state_dict().items()},
    )
    ckpt = state.to_checkpoint(net, opt, sched, cfg=cfg, fingerprint={"precision": "fp32"}, on_cuda=False)
    assert set(ckpt) == {
        "objective", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "step", "steps", "curve",
        "best", "best_step", "best_state", "ema", "fingerprint", "config",
    }  # fmt: skip
    assert ckpt["steps"] == 6 and ckpt["rng_cuda"] is None and ckpt["config"]["warmup_steps"] == 2
    torch.save(ckpt, tmp_path / "ckpt.pt")
    x, draws = torch.rand(4, 3), torch.rand(5)  # what the saved RNG gives next

    net2, opt2, sched2 = machinery(1)
    ckpt2 = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    loaded = TrainState.from_checkpoint(ckpt2, net2, opt2, sched2, on_cuda=False)
    assert (loaded.step, loaded.curve, loaded.best, loaded.best_step) == (2, state.curve, {"psnr": 20.0}, 2)
    assert loaded.best_state.keys() == state.best_state.keys()
    assert all(torch.equal(loaded.best_state[k], v) for k, v in state.best_state.items())
    # Written again, it is the checkpoint it was read from.
    again = loaded.to_checkpoint(
        net2, opt2, sched2, cfg=cfg, fingerprint={"precision": "fp32"}, on_cuda=False
    )
    for key in ("step", "steps", "curve", "best", "best_step", "fingerprint", "config", "scheduler"):
        assert again[key] == ckpt[key], key
    assert torch.equal(again["rng_cpu"], ckpt["rng_cpu"])
    assert all(torch.equal(again["objective"][k], v) for k, v in ckpt["objective"].items())
    assert torch.equal(torch.rand(4, 3), x) and torch.equal(torch.rand(5), draws)
    # The next step from the loaded state is the next step of the saved one, learning rate included.
    train_step(net, opt, sched, x)
    train_step(net2, opt2, sched2, x)
    assert sched2.get_last_lr() == sched.get_last_lr()
    after, after2 = net.state_dict(), net2.state_dict()
    assert all(torch.equal(after[k], after2[k]) for k in after)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Real degrade + trained tiny teacher + teacher cache, built once for this module."""
    return make_teacher_cache(tmp_path_factory.mktemp("pipe"), tiny_params())


def _distill(root, params, tag):
    from stages import distill

    paths = stage_paths(
        root, student=root / tag / "student", checkpoints=root / tag / "ckpt", metrics=root / tag / "metrics"
    )
    return distill.run(params, paths, NullTracker())


def test_distill_writes_outputs(pipeline):
    summary = _distill(pipeline, tiny_params(loss={"feature": 0.1}), "full")
    assert summary["steps"] == 12 and summary["best_step"] in (6, 12) and summary["val_psnr"] > 0
    out = pipeline / "full"
    assert (out / "student/student.pth").is_file() and (out / "student/last.pth").is_file()
    assert json.loads((out / "metrics/train.json").read_text())["steps"] == 12
    # A row per validation (eval_every 6 of 12 steps: 6 and 12), every step in train_steps.tsv.
    curve = pd.read_csv(out / "metrics/train_curve.tsv", sep="\t")
    assert list(curve.columns[:2]) == ["step", "loss"] and list(curve["step"]) == [6, 12]
    assert curve["val_psnr"].notna().all() and not curve.isna().any().any()
    steps = pd.read_csv(out / "metrics/train_steps.tsv", sep="\t")
    assert list(steps["step"]) == list(range(1, 13)) and "val_psnr" not in steps
    assert curve["loss"].tolist() == pytest.approx(
        [steps["loss"][:6].mean(), steps["loss"][6:].mean()], rel=1e-4
    )
    assert json.loads((out / "student/student.json").read_text())["loss_terms"] == ["pixel", "kd", "feature"]


def _teacher_only_params(root: Path):
    """Teacher-only crops in every batch: an unlabeled folder and the zoomed-in training images."""
    folder = root / "unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 52), (33, 30)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"u{i}.png")
    return tiny_params(
        data={"teacher_only": {"folder": str(folder), "upcycle": ["zoom_in"], "max_side": 40}},
        distill={"teacher_only_fraction": 0.5},
        loss={"feature": 0.1, "feature_affinity": 0.1},
    )


@pytest.fixture(scope="module")
def pipeline_teacher_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe_to")
    return make_teacher_cache(root, _teacher_only_params(root))


@pytest.mark.parametrize("data", ["labelled", "teacher_only"])
def test_resume_equals_uninterrupted(data, request, monkeypatch):
    import sharpkd.data.datasets as ds

    if data == "labelled":
        pipeline, params = request.getfixturevalue("pipeline"), tiny_params()
    else:
        pipeline = request.getfixturevalue("pipeline_teacher_only")
        params = _teacher_only_params(pipeline)
    ref = _distill(pipeline, params, "ref")
    if data == "teacher_only":
        assert ref["teacher_only_per_batch"] == 2  # of 4
    ref_state = torch.load(pipeline / "ref/student/last.pth", weights_only=True)["state_dict"]

    # Kill the run at step 9 (after the checkpoint at step 8), then start it again.
    original = ds.TrainPatches.batch_fn

    def dying(self, *a, **k):
        fn = original(self, *a, **k)

        def batch(step):
            if step == 9:
                raise KeyboardInterrupt
            return fn(step)

        return batch

    monkeypatch.setattr(ds.TrainPatches, "batch_fn", dying)
    with pytest.raises(KeyboardInterrupt):
        _distill(pipeline, params, "resumed")
    assert not (pipeline / "resumed/student").exists()  # nothing half-written
    monkeypatch.setattr(ds.TrainPatches, "batch_fn", original)
    again = _distill(pipeline, params, "resumed")
    assert again["resumed_from"] == 8 and again["steps_per_s"] > 0
    state = torch.load(pipeline / "resumed/student/last.pth", weights_only=True)["state_dict"]
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k
    assert again["val_psnr"] == ref["val_psnr"]
    # Run again (dvc repro -f): it resumes at the last step, runs none, and says so instead of "0 steps/s".
    done = _distill(pipeline, params, "resumed")
    assert done["resumed_from"] == done["steps"] and done["steps_per_s"] is None
    assert "no step ran" in done["steps_per_s_reason"]
    assert done["val_psnr"] == ref["val_psnr"]


def test_no_teacher_baseline_needs_no_training_cache(pipeline, tmp_path):
    """distill.teacher false: cache_teacher runs the teacher on the validation images only, distill reads none of it."""
    from stages import cache_teacher

    params = tiny_params(distill={"teacher": False}, loss={"kd": 0.0, "feature": 0.0})
    cache = tmp_path / "cache"
    paths = stage_paths(pipeline, teacher_cache=cache)
    info = cache_teacher.run(params, paths, NullTracker())
    assert info["train"] is False and info["bytes"] == 0
    assert sorted(p.name for p in cache.iterdir()) == ["cache.json", "valid"]
    summary = _distill_with_cache(pipeline, params, cache, "baseline")
    assert summary["steps"] == 12 and summary["teacher_only_per_batch"] == 0
    # A distilled run against that cache is told what to rebuild, before any step.
    with pytest.raises(UserError, match="no training outputs.*dvc repro cache_teacher"):
        _distill_with_cache(pipeline, tiny_params(), cache, "distilled")


def _distill_with_cache(root, params, cache, tag):
    from stages import distill

    paths = stage_paths(
        root,
        teacher_cache=cache,
        student=root / tag / "student",
        checkpoints=root / tag / "ckpt",
        metrics=root / tag / "metrics",
    )
    return distill.run(params, paths, NullTracker())


def test_two_process_gloo(pipeline, tmp_path):
    """`torchrun --nproc_per_node=2 stages/distill.py` trains with DDP on CPU; rank 0 writes."""
    work = tmp_path / "ddp"
    (work / "data").mkdir(parents=True)
    for sub in ("pairs", "teacher"):
        os.symlink(pipeline / "data" / sub, work / "data" / sub)
    import yaml

    from helpers import TINY, deep_update, repo_params_dict

    (work / "params.yaml").write_text(yaml.safe_dump(deep_update(repo_params_dict(), TINY)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "stages" / "distill.py"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "metrics/train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert (work / "models/student/student.pth").is_file()


# ---------------------------------------------------------------- the teacher cache changed behind DVC's back


def test_cache_json_records_the_sha256_of_each_array(pipeline):
    from sharpkd.fetch import file_digest

    cache = pipeline / "data/teacher"
    info = json.loads((cache / "cache.json").read_text())
    recorded = info["pools"]["train"]["sha256"]
    assert recorded == {name: file_digest(cache / name) for name in ("train_out.npy", "train_feat.npy")}
    assert info["hash_seconds"] >= 0


def _corrupt(path: Path, how: str) -> None:
    """Change a store array as a disk error or a stray tool would: `same_size` keeps its size and mtime (DVC's
    state cache then still takes it for the file it hashed), `truncated` cuts its end off."""
    st = path.stat()
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(st.st_size - 100)
        return
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "file,how,says",
    [
        (
            "data/teacher/train_out.npy",
            "same_size",
            "data/teacher/train_out.npy does not match the sha256 cache_teacher recorded in cache.json",
        ),
        (
            "data/teacher/train_out.npy",
            "truncated",
            "data/teacher/train_out.npy does not match the sha256 cache_teacher recorded in cache.json",
        ),
        (
            "data/pairs/train_input.npy",
            "truncated",
            "data/pairs/train_input.npy cannot be read as a .npy array (mmap length is greater than file size)",
        ),
    ],
)
def test_a_changed_store_array_stops_distill_with_one_line(pipeline, tmp_path, file, how, says):
    """stages/distill.py run directly (as after a `dvc status` that saw nothing): one line naming the file and
    the `dvc repro -f` that rebuilds it, exit status 1, before any step, and nothing written."""
    import shutil

    import yaml

    import sharpkd
    from helpers import TINY, deep_update, repo_params_dict

    repo = tmp_path / "repo"
    for sub in ("pairs", "teacher"):
        shutil.copytree(pipeline / "data" / sub, repo / "data" / sub)
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_update(repo_params_dict(), TINY)))
    _corrupt(repo / file, how)
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/distill.py")],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(Path(sharpkd.__file__).parents[1]), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error [distill]")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-3000:]
    stage = "cache_teacher" if "teacher" in file else "degrade"
    assert errors[0].endswith(f"run `dvc repro -f {stage}`")
    assert not (repo / "models/student").exists() and not (repo / "models/checkpoints").exists()


def test_a_checkpoint_resumes_only_on_the_cache_it_was_trained_on(pipeline, tmp_path):
    """The arrays' sha256 are part of the resume fingerprint: the same bytes resume (a finished run runs no
    step), other teacher outputs with their own checksums (a rebuilt cache that differs) train again."""
    import shutil

    from sharpkd.fetch import file_digest

    cache = tmp_path / "cache"
    shutil.copytree(pipeline / "data/teacher", cache)
    params = tiny_params()
    assert _distill_with_cache(pipeline, params, cache, "run")["resumed_from"] == 0
    assert _distill_with_cache(pipeline, params, cache, "run")["resumed_from"] == 12
    _corrupt(cache / "train_out.npy", "same_size")
    info = json.loads((cache / "cache.json").read_text())
    info["pools"]["train"]["sha256"]["train_out.npy"] = file_digest(cache / "train_out.npy")
    (cache / "cache.json").write_text(json.dumps(info))
    assert _distill_with_cache(pipeline, params, cache, "run")["resumed_from"] == 0


def test_weight_average_follows_the_formula_and_swaps_back():
    from sharpkd.train import WeightAverage

    net = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    avg = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net.weight.add_(1.0)
    avg.update(net)  # decay min(0.5, 2/11) = 2/11
    d = 2 / 11
    expected = start["weight"] * d + net.weight.detach() * (1 - d)
    raw = net.weight.detach().clone()
    with avg.swapped_in(net):
        assert torch.allclose(net.weight, expected)
    assert torch.equal(net.weight, raw)  # the raw weights are back after the block
    again = WeightAverage(net, 0.5, avg.state_dict())  # as a resumed run rebuilds it
    assert again.updates == 1 and torch.allclose(again.weights[again.names.index("weight")], expected)


def test_ema_is_what_is_validated_and_kept_and_survives_a_resume(tmp_path):
    """With cfg.ema_decay the averaged weights are validated and kept (best_state), the raw ones are
    validated beside them (val_raw_psnr), and a run resumed from a checkpoint ends where an
    uninterrupted one does."""

    def run(ckpt, steps, stop=None):
        torch.manual_seed(0)
        student = Student(scale=2, channels=8, blocks=1)
        obj = DistillObjective(student, loss_params(pixel=1, kd=0))
        fixed = [_batch() for _ in range(8)]
        val = fixed[0]

        def batch_fn(step):
            if step == stop:
                raise KeyboardInterrupt
            return fixed[step]

        def evaluate():
            return {"psnr": -float(F.l1_loss(student(val["input"]), val["hr"]))}

        cfg = FitConfig(steps=steps, lr=1e-2, eval_every=2, checkpoint_every=2, ema_decay=0.9)
        return fit(obj, batch_fn, cfg, evaluate=evaluate, checkpoint_path=ckpt), obj

    ref, obj = run(tmp_path / "a.pt", 8)
    rows = [r for r in ref.curve if "val_psnr" in r]
    assert len(rows) == 4 and all("val_raw_psnr" in r for r in rows)
    assert any(r["val_psnr"] != r["val_raw_psnr"] for r in rows)
    assert ref.best_metrics["raw_psnr"] == next(r["val_raw_psnr"] for r in rows if r["step"] == ref.best_step)
    if ref.best_step == 8:  # what is kept at the end is the average, not the raw weights
        raw_end = obj.state_dict()
        assert any(not torch.equal(ref.best_state[k], v) for k, v in raw_end.items() if v.is_floating_point())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", 8, stop=5)
    resumed, _ = run(tmp_path / "b.pt", 8)
    assert resumed.resumed_from == 4
    assert resumed.best_step == ref.best_step
    for k, v in ref.best_state.items():
        assert torch.equal(v, resumed.best_state[k]), k
