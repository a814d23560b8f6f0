"""Experiment profiles: overlays of params.yaml in profiles/*.yaml, queued as DVC experiments.

A profile is a YAML file a user can read, diff and run:

    description: what the experiment asks
    extends: reference.yaml      # optional: start from another profile's `set` (same folder)
    jobs: 2                      # experiments `dvc exp run --run-all` runs at once
    set: {distill.steps: 24000}  # dotted keys every arm shares, as `dvc exp run -S` takes them
    arms:
      ref-distill-rep64x5:
        label: distilled, labelled images     # the row name in the results tables
        set: {loss.kd: 1.0}                   # this arm's own keys (optional)
    table: {ref-baseline-rep64x5: label, ...} # optional: the arms a results table compares

`{shared}` in a string value is the folder of the project's shared data (../shared, or
$SHARPKD_SHARED): queued experiments run in a temporary copy of the repository, so paths must be
absolute. Every arm is validated against params.yaml (config.py) before anything is queued, so a
misspelt key fails at once, not an hour into a queue. Overlay files, not DVC's Hydra composition:
params.yaml stays the one file the stages read and `-S` keeps working as documented; a profile is
only a named, reviewable list of `-S` values.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sharpkd.config import ConfigError, flatten, params_from_dict, read_yaml
from sharpkd.errors import UserError

PROFILE_KEYS = {"description", "extends", "jobs", "set", "arms", "table"}
ARM_KEYS = {"label", "set"}


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: dict[str, object]  # dotted key -> value: the profile's `set`, then the arm's own


@dataclass(frozen=True)
class Profile:
    path: Path
    description: str
    jobs: int
    common: dict[str, object]  # the `set` every arm shares (with what it extends)
    arms: list[Arm] = field(default_factory=list)
    table: dict[str, str] = field(default_factory=dict)  # arm -> row label, for the results tables

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise UserError(f"{self.path}: no arm named {name!r} (arms: {', '.join(a.name for a in self.arms)})")


def shared_dir() -> Path:
    return Path(os.environ.get("SHARPKD_SHARED") or "../shared").expanduser().resolve()


def _read(path: Path) -> dict:
    raw = read_yaml(path, "profile")
    if not isinstance(raw, dict):
        raise UserError(f"profile {path} must be a mapping with `arms`")
    unknown = sorted(set(raw) - PROFILE_KEYS)
    if unknown:
        raise UserError(
            f"profile {path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(PROFILE_KEYS))})"
        )
    return raw


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of dotted params keys to values")
    return {str(k): v for k, v in value.items()}


def _expand(value):
    if isinstance(value, str):
        return value.replace("{shared}", str(shared_dir()))
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_profile(path: str | Path) -> Profile:
    """The profile at `path` with `extends` resolved and `{shared}` expanded (not yet validated)."""
    path = Path(path)
    raw = _read(path)
    common = load_profile(path.parent / raw["extends"]).common if raw.get("extends") else {}
    common = {**common, **{k: _expand(v) for k, v in _mapping(raw.get("set"), f"{path}: set").items()}}
    arms = []
    for name, spec in _mapping(raw.get("arms"), f"{path}: arms").items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - ARM_KEYS:
            raise UserError(f"{path}: arm {name!r} may only have {', '.join(sorted(ARM_KEYS))}")
        own = {k: _expand(v) for k, v in _mapping(spec.get("set"), f"{path}: arms.{name}.set").items()}
        arms.append(Arm(name, str(spec.get("label") or name), {**common, **own}))
    if not arms:
        raise UserError(f"{path}: no arms")
    jobs = raw.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"{path}: jobs must be a positive integer, got {jobs!r}")
    table = raw.get("table") or {}
    table = {str(n): "" for n in table} if isinstance(table, list) else _mapping(table, f"{path}: table")
    return Profile(
        path,
        str(raw.get("description") or ""),
        jobs,
        common,
        arms,
        {k: str(v or "") for k, v in table.items()},
    )


def apply_overrides(base: dict, overrides: dict[str, object]) -> dict:
    """params.yaml's dict with dotted `overrides` set (a key params.yaml lacks is added, as DVC's `++`)."""
    params = copy.deepcopy(base)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = params
        for part in parents:
            if target.get(part) is None:  # e.g. eval.sets: {} gains a set
                target[part] = {}
            target = target[part]
        target[leaf] = value
    return params


def validate(profile: Profile, params_path: Path = Path("params.yaml")) -> dict[str, object]:
    """Each arm's params as the pipeline would load them; a bad key names the profile and arm."""
    base = yaml.safe_load(params_path.read_text())
    out = {}
    for arm in profile.arms:
        try:
            out[arm.name] = params_from_dict(apply_overrides(base, arm.overrides))
        except ConfigError as exc:
            raise UserError(f"{profile.path}: arm {arm.name}: {exc}") from None
    return out


def set_flags(arm: Arm, params_path: Path = Path("params.yaml")) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`; `++key` where params.yaml lacks the key."""
    known = set(flatten(yaml.safe_load(params_path.read_text())))
    flags = []
    for key, value in arm.overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        text = text.removesuffix("\n...").strip()
        flags += ["-S", f"{'' if key in known else '++'}{key}={text}"]
    return flags


def queue_commands(profile: Profile, arms: list[str] | None = None) -> list[list[str]]:
    """The `dvc exp run --queue` command of each arm (all arms, or those named)."""
    chosen = [profile.arm(n) for n in arms] if arms else profile.arms
    return [["dvc", "exp", "run", "--queue", "-n", a.name, *set_flags(a)] for a in chosen]


def queue(profile: Profile, arms: list[str] | None = None, dry_run: bool = False, echo=print) -> list[str]:
    """Validate, remove same-named experiments, queue each arm; returns the queued names."""
    validate(profile)
    commands = queue_commands(profile, arms)
    for cmd in commands:
        name = cmd[cmd.index("-n") + 1]
        echo(shlex.join(cmd))
        if dry_run:
            continue
        # `dvc exp remove a b` removes nothing when one is missing: one name at a time.
        subprocess.run(["dvc", "exp", "remove", name], capture_output=True)
        subprocess.run(cmd, check=True)
    return [cmd[cmd.index("-n") + 1] for cmd in commands]
