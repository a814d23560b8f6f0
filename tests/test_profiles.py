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
from sharpkd.profiles import load_profile, queue, queue_commands, validate

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


# --------------------------------------------------------------------------- issue 40 (hardening, round 4)


@pytest.fixture
def no_dvc(monkeypatch):
    """Run from the repository root (validate reads ./params.yaml) with every subprocess recorded, none run."""
    monkeypatch.chdir(REPO)
    calls: list[list[str]] = []

    def run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0, b"", b"")

    monkeypatch.setattr("sharpkd.profiles.subprocess.run", run)
    return calls


def _write(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_row01_arm_named_like_an_option_is_refused(tmp_path, no_dvc):
    """`--all` as an arm name: refused when validated (also --dry-run); no `dvc exp remove` runs."""
    path = _write(tmp_path, "arms:\n  --all: {set: {distill.steps: 10}}\n")
    for dry_run in (True, False):
        with pytest.raises(UserError, match=r"arm name '--all' cannot be a DVC experiment name"):
            queue(load_profile(path), dry_run=dry_run)
    assert no_dvc == []


def test_row01_queue_removes_a_same_named_experiment_after_double_dash(tmp_path, no_dvc):
    """Whatever a name is, `dvc exp remove` reads it as a name, never as an option."""
    from dvc.cli import parse_args

    path = _write(tmp_path, "arms:\n  a-1: {set: {distill.steps: 10}}\n")
    assert queue(load_profile(path)) == ["a-1"]
    remove, run = no_dvc
    assert remove == ["dvc", "exp", "remove", "--", "a-1"]
    assert parse_args(remove[1:]).experiment == ["a-1"] and parse_args(
        ["exp", "remove", "--", "--all"]
    ).experiment == ["--all"]
    assert run[:6] == ["dvc", "exp", "run", "--queue", "-n", "a-1"]


@pytest.mark.parametrize(
    "name",
    [
        "a b",
        "a;b",
        "a/b",
        "a:b",
        "-n",
        "deadbeef",
        "a..b",
        "x.lock",
        "x.",
        "ünï",
        "a~1",
        "a^",
        "a*",
        "x" * 101,
    ],
)
def test_row20_arm_names_dvc_cannot_take_are_refused_before_anything_is_queued(tmp_path, no_dvc, name):
    path = _write(tmp_path, yaml.safe_dump({"arms": {"good-arm": {}, name: {}}}))
    with pytest.raises(UserError) as err:
        queue(load_profile(path))
    assert "cannot be a DVC experiment name" in str(err.value) and "\n" not in str(err.value)
    assert no_dvc == [], "nothing is removed or queued"


def test_row20_a_queue_that_fails_is_one_line_naming_the_arm(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    runs = iter([0, 0, 0, 2])  # remove a, queue a, remove b, queue b fails

    def run(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, next(runs), b"", b"")

    monkeypatch.setattr("sharpkd.profiles.subprocess.run", run)
    path = _write(tmp_path, "arms: {a: {}, b: {}}\n")
    with pytest.raises(UserError, match=r"failed for arm b \(see above\); queued before it: a$"):
        queue(load_profile(path))


# Values `dvc exp run -S` would read as syntax (a sweep, a function, a quote, a key=value...) or as another
# type, and strings a shell or YAML treats specially: each must reach params.yaml as it is.
TRICKY = [
    "{tmp}/pp/a,b",
    "{tmp}/pp/f(x)",
    "{tmp}/pp/it's",
    "{tmp}/pp/k=v",
    "{tmp}/pp/[x]{y}",
    '{tmp}/pp/"q"',
    "{tmp}/pp/a b ",
    " {tmp}/lead",
    "{tmp}/back\\slash\\",
    "{tmp}/b\\'q",
    "{tmp}/#x:y!*?~&%$@|<>",
    "{tmp}/ünïcödé",
    "{tmp}/range(1,3)",
    "{tmp}/choice(a,b)",
    "{tmp}/glob(*)",
]


def _dvc_applies(flags: list[str], params_file) -> dict:
    """params.yaml after DVC's own `-S` handling (dvc/utils/hydra.py, as `dvc exp run` does it)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides as dvc_apply
    from dvc.utils.hydra import to_hydra_overrides

    from sharpkd.config import load_yaml_text

    overrides = to_path_overrides([f for f in flags if f != "-S"])
    assert list(overrides) == ["params.yaml"], overrides
    parsed = to_hydra_overrides(overrides["params.yaml"])
    assert not any(o.is_sweep_override() for o in parsed), "one experiment, not a sweep"
    dvc_apply(params_file, overrides["params.yaml"])
    return load_yaml_text(params_file.read_text())  # as the stages read it


def test_row05_profile_values_reach_params_yaml_as_they_are(tmp_path):
    from sharpkd.config import flatten
    from sharpkd.profiles import Arm, apply_overrides, set_flags

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for i, template in enumerate(TRICKY):
        value = template.replace("{tmp}", str(tmp_path))
        arm = Arm(
            "a", "a", {"data.teacher_only.folder": value, "eval.sets.Odd-set_1": value, "distill.lr": 1e-05}
        )
        params_file = tmp_path / f"params{i}.yaml"
        params_file.write_text((REPO / "params.yaml").read_text())
        got = _dvc_applies(set_flags(arm, REPO / "params.yaml"), params_file)
        assert flatten(got) == flatten(apply_overrides(base, arm.overrides)), value


def test_row05_values_dvc_cannot_carry_are_refused_at_validation(tmp_path, no_dvc):
    from sharpkd.profiles import Arm, set_flags

    for value, says in [("/x/${oc.env:HOME}", "interpolation"), ("/x/a\nb", "control character")]:
        path = _write(tmp_path, yaml.safe_dump({"arms": {"a": {"set": {"data.folder.valid": value}}}}))
        with pytest.raises(UserError, match=rf"arm a: 'data.folder.valid': .*{says}"):
            queue(load_profile(path), dry_run=True)
    arm = Arm("a", "a", {"eval.sets.a:b": "/x"})  # the key: config refuses such a set name first
    with pytest.raises(UserError, match=r"the key 'eval.sets.a:b' cannot be given to `dvc exp run -S`"):
        set_flags(arm, REPO / "params.yaml")
    assert no_dvc == []


def test_row12_an_extends_cycle_is_one_line(tmp_path):
    _write(tmp_path, "extends: self.yaml\narms: {a: {}}\n", "self.yaml")
    _write(tmp_path, "extends: b.yaml\narms: {a: {}}\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\narms: {b: {}}\n", "b.yaml")
    for name, cycle in [("self.yaml", "self.yaml -> self.yaml"), ("a.yaml", "a.yaml -> b.yaml -> a.yaml")]:
        with pytest.raises(UserError) as err:
            load_profile(tmp_path / name)
        assert f"`extends` makes a cycle: {cycle}" in str(err.value) and "\n" not in str(err.value)


def test_row19_an_arm_given_twice_is_refused(tmp_path):
    path = _write(tmp_path, "arms:\n  a: {set: {distill.steps: 10}}\n  a: {set: {distill.steps: 20}}\n")
    with pytest.raises(UserError, match=r"the key 'a' is given twice \(lines 2 and 3\)"):
        load_profile(path)
    path = _write(tmp_path, "arms:\n  1: {}\n  '1': {}\n")
    with pytest.raises(UserError, match=r"'1' given twice"):
        load_profile(path)


def test_row19_a_duplicate_key_in_params_yaml_is_refused(tmp_path):
    from sharpkd.config import ConfigError, load_params

    text = (REPO / "params.yaml").read_text()
    assert text.startswith("seed:") or "\nseed:" in text
    params = tmp_path / "params.yaml"
    params.write_text(text + "\nseed: 7\n")
    with pytest.raises(ConfigError, match=r"params: .*params.yaml is refused: the key 'seed' is given twice"):
        load_params(params)
    with pytest.raises(ConfigError, match=r"the key 'seed' is given twice"):
        validate(load_profile(_write(tmp_path, "arms: {a: {}}\n")), params)


BILLION_LAUGHS = "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9)
)


def test_row21_a_yaml_billion_laughs_is_refused_before_it_is_expanded(tmp_path, no_dvc):
    """In a profile (whose values are expanded for `{shared}`) and in params.yaml: refused in well under a
    second, before any `dvc` command (DVC itself expands params.yaml: docs/reliability.md)."""
    import time

    from sharpkd.config import ConfigError, load_params

    start = time.monotonic()
    profile = _write(tmp_path, BILLION_LAUGHS + "set: {eval.sets.x: *l8}\n")
    with pytest.raises(UserError, match=r"more than 100000 values once its aliases are written out"):
        queue(load_profile(profile))
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text() + BILLION_LAUGHS)
    with pytest.raises(ConfigError, match=r"billion laughs"):
        load_params(params)
    with pytest.raises(ConfigError, match=r"billion laughs"):
        validate(load_profile(_write(tmp_path, "arms: {a: {}}\n")), params)
    assert time.monotonic() - start < 5 and no_dvc == []


def test_row20_profile_run_checks_every_profile_before_it_queues_any(tmp_path, no_dvc):
    """`sharpkd profile run good.yaml bad.yaml`: the bad arm (or an arm name the first profile has too) is
    refused before the good profile's arms are queued."""
    from typer.testing import CliRunner

    from sharpkd.cli import app

    good = _write(tmp_path, "arms: {a: {}}\n", "good.yaml")
    for text in ("arms: {'b c': {}}\n", "arms: {a: {}}\n"):
        bad = _write(tmp_path, text, "bad.yaml")
        res = CliRunner().invoke(app, ["profile", "run", str(good), str(bad)])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert "cannot be a DVC experiment name" in res.output or "is also an arm of" in res.output, (
            res.output
        )
    assert no_dvc == []
