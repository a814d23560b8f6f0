"""The experiment profiles (profiles/*.yaml): every arm is a valid params.yaml overlay, queued as asked.

Each arm's overrides are applied to params.yaml and validated as the pipeline would, so a misspelt
key or a bad value in a profile fails here rather than an hour into a queue; the Makefile's
experiment targets only name profiles.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest
import yaml

from helpers import REPO
from sharpkd.errors import UserError
from sharpkd.profiles import load_profile, queue_commands, validate

PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def _profile(name: str):
    return load_profile(REPO / "profiles" / f"{name}.yaml")


def test_every_profile_is_valid():
    assert {p.stem for p in PROFILES} >= {"reference", "domain", "sweep", "full"}
    for path in PROFILES:
        profile = load_profile(path)
        params = validate(profile, REPO / "params.yaml")
        assert list(params) == [a.name for a in profile.arms], path
        known = {a.name for p in PROFILES for a in load_profile(p).arms}
        missing = [n for n in profile.table if n not in known]
        assert not missing, f"{path}: table names arms no profile has: {missing}"


def test_reference_and_domain_arms_at_equal_compute():
    arms = {
        **validate(_profile("reference"), REPO / "params.yaml"),
        **validate(_profile("domain"), REPO / "params.yaml"),
    }
    for name, p in arms.items():
        assert set(p.eval.sets) == {"Set5", "Manga109"}, name
        assert (p.distill.steps, p.distill.batch_size, p.compute.threads) == (24000, 32, 1), name
        student = f"{p.student.block}{p.student.channels}x{p.student.blocks}"
        assert name.endswith(f"-{student}") or f"-{student}-" in name, (
            f"{name} is not named after its student"
        )
        assert p.eval.sets["Set5"].startswith("/"), "queued experiments run in a copy: paths are absolute"
    assert not arms["ref-baseline-rep64x5"].distill.teacher and arms["ref-distill-rep64x5"].distill.teacher
    assert arms["ref-upcycle-rep64x5"].data.teacher_only.upcycle == ("zoom_out",)
    assert arms["ref-upcycle-rep64x5"].distill.teacher_only_fraction == 0.1
    assert arms["dom-manga-rep64x5"].data.teacher_only.folder.endswith("Manga109/unlabeled_x4")


def test_teacher_speed_and_recipe_arms_at_the_reference_budget():
    """Issue 26's arms are compared with the reference's: same data, steps, batch and threads; a recipe arm
    differs from its control (the speed profile's 32 x 4) in its one lever only."""
    arms = {
        name: p
        for profile in ("teachers", "speed", "recipe", "lr")
        for name, p in validate(_profile(profile), REPO / "params.yaml").items()
    }
    for name, p in arms.items():
        assert set(p.eval.sets) == {"Set5", "Manga109"}, name
        assert (p.distill.steps, p.distill.batch_size, p.compute.threads) == (24000, 32, 1), name
        assert p.data.folder.train == arms["ref-dctlsa-ema-rep64x5"].data.folder.train, name
    control, lever = arms["speed-rep-32x4"], arms["recipe-kd2-rep32x4"]
    assert lever.loss.kd == 2.0 and control.loss.kd == 1.0
    assert dataclasses.replace(lever, loss=control.loss) == control
    control, lever = arms["lr1e3-rep32x4"], arms["lr2e3-rep32x4"]
    assert (lever.distill.lr, lever.distill.warmup_steps) == (0.002, 1000)
    assert (
        dataclasses.replace(lever, distill=dataclasses.replace(lever.distill, lr=0.001, warmup_steps=300))
        == control
    )
    assert not control.compute.amp and control.student == arms["speed-rep-32x4"].student
    assert arms["ref-ensemble-ema-rep64x5"].teacher.ensemble == ("pan",)
    assert arms["ref-pan-x8-ema-rep64x5"].teacher.self_ensemble


def test_sweep_arms_are_set_as_named():
    for name, p in validate(_profile("sweep"), REPO / "params.yaml").items():
        block, size = name.split("-")[1:3]
        channels, blocks = (int(v) for v in size.split("x"))
        assert (p.student.block, p.student.channels, p.student.blocks) == (block, channels, blocks), name


def test_queue_commands_add_keys_params_yaml_lacks():
    cmd = queue_commands(_profile("reference"), ["ref-upcycle-rep64x5"])[0]
    flags = [cmd[i + 1] for i, w in enumerate(cmd) if w == "-S"]
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "ref-upcycle-rep64x5"]
    assert any(f.startswith("++eval.sets.Set5=/") for f in flags)  # eval.sets is {} in params.yaml
    assert "data.teacher_only.upcycle=[zoom_out]" in flags and "distill.teacher_only_fraction=0.1" in flags
    assert "{shared}" not in " ".join(flags)


def test_shared_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARPKD_SHARED", str(tmp_path))
    arm = _profile("domain").arm("dom-manga-rep64x5")
    assert arm.overrides["data.teacher_only.folder"] == f"{tmp_path}/domains/Manga109/unlabeled_x4"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("arms: {a: {set: {distill.warmup_step: 3}}}", "arm a: params: unknown key 'distill.warmup_step'"),
        ("arms: {a: {set: {data.unlabeled: /x}}}", "was renamed 'data.teacher_only.folder'"),
        ("arms: {a: {set: {distill.lr: fast}}}", "'distill.lr' must be a number"),
        ("arms: {a: {lable: x}}", "arm 'a' may only have label, set"),
        ("arm: {}", "unknown key 'arm'"),
        ("jobs: 0\narms: {a: {}}", "jobs must be a positive integer"),
        ("arms: {}", "no arms"),
        ("[1, 2]", "must be a mapping"),
        ("arms: {a: [}", "not valid YAML"),
    ],
)
def test_a_bad_profile_names_the_file_and_what_is_wrong(tmp_path, monkeypatch, text, says):
    monkeypatch.chdir(REPO)  # validate reads ./params.yaml
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        validate(load_profile(path))
    assert says in str(err.value) and str(path) in str(err.value), str(err.value)


def test_profile_cli_dry_run_and_errors(tmp_path):
    env_path = f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin"
    ok = subprocess.run(
        ["sharpkd", "profile", "queue", "profiles/domain.yaml", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, env={"PATH": env_path},
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("dvc exp run --queue -n dom-manga-rep64x5 ")
    bad = subprocess.run(
        ["sharpkd", "profile", "queue", str(tmp_path / "none.yaml")],
        cwd=REPO, capture_output=True, text=True, env={"PATH": env_path},
    )  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "none.yaml not found" in bad.stderr


def test_the_makefile_names_profiles_not_values():
    """Experiment values live in profiles/*.yaml: no `-S` string and no restated param in the Makefile."""
    text = (REPO / "Makefile").read_text()
    assert not re.search(r"(^|\s)-S\s", text)
    out = subprocess.run(
        ["make", "-n", "-s", "reference", "domain-results"], cwd=REPO, capture_output=True, text=True
    )
    assert "sharpkd profile run profiles/reference.yaml" in out.stdout
    assert "--profile profiles/domain.yaml" in out.stdout


def test_profiles_are_plain_yaml_a_user_can_read():
    for path in PROFILES:
        raw = yaml.safe_load(path.read_text())
        assert raw.get("description"), f"{path}: say what the experiment asks"
