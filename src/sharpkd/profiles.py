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

What reaches DVC is checked for its grammar first (docs/reliability.md, round 4): an arm name must be
a name `dvc exp run -n` and `dvc exp remove` take as an experiment name (letters, digits, `.`, `_`,
`-`; not an option, not a commit-like hex string), and each value is written in the Hydra override
grammar `-S` parses (strings quoted where a `,` `(` `'` `=` ... would be read as syntax); a value that
grammar cannot carry (`${`, control characters) is refused when the profile is validated.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sharpkd.config import ConfigError, flatten, params_from_dict, read_yaml
from sharpkd.errors import UserError

PROFILE_KEYS = {"description", "extends", "jobs", "set", "arms", "table"}
ARM_KEYS = {"label", "set"}

# An experiment name DVC takes as a name: a git ref component without `/`, that argparse cannot read as
# an option and `dvc exp remove` cannot read as a commit (hex).
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HEX = re.compile(r"[0-9a-fA-F]{4,40}")
# Hydra's override grammar (`dvc exp run -S key=value`): a key part, a dict key, and a string it reads
# back unquoted as that same string; anything else is quoted.
_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*|[0-9]+")
_DICT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./@%+-]*")
_NOT_STRINGS = {"true", "false", "null", "inf", "nan"}  # read as other types, in any case
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def check_arm_name(name: str, where: str | Path) -> None:
    """UserError unless `name` is a name DVC takes as an experiment name (see _ARM_NAME)."""
    if (
        _ARM_NAME.fullmatch(name)
        and ".." not in name
        and not name.endswith((".lock", "."))
        and not _HEX.fullmatch(name)
    ):
        return
    raise UserError(
        f"{where}: arm name {name!r} cannot be a DVC experiment name: use letters, digits, '.', '_' and '-' "
        "(at most 100, starting with a letter or digit, not all hex digits, no '..', not ending in '.' or "
        "'.lock')"
    )


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
    out = {str(k): v for k, v in value.items()}
    if len(out) != len(value):
        twice = sorted({str(k) for k in value if [str(j) for j in value].count(str(k)) > 1})
        raise UserError(f"{where}: {', '.join(map(repr, twice))} given twice (as different YAML types)")
    return out


def _expand(value):
    if isinstance(value, str):
        return value.replace("{shared}", str(shared_dir()))
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_profile(path: str | Path) -> Profile:
    """The profile at `path` with `extends` resolved and `{shared}` expanded (not yet validated)."""
    return _load(Path(path), ())


def _extends(path: Path, raw: dict, chain: tuple[Path, ...]) -> dict[str, object]:
    """The `set` of the profile `raw` extends ({} for none); a cycle of `extends` is one line naming it."""
    name = raw.get("extends")
    if not name:
        return {}
    if not isinstance(name, str):
        raise UserError(f"profile {path}: extends must be a file name, got {name!r}")
    parent = path.parent / name
    if parent.resolve() in chain:
        cycle = [p.name for p in chain[chain.index(parent.resolve()) :]] + [parent.name]
        raise UserError(f"profile {path}: `extends` makes a cycle: {' -> '.join(cycle)}")
    return _load(parent, chain).common


def _load(path: Path, chain: tuple[Path, ...]) -> Profile:
    raw = _read(path)
    chain = (*chain, path.resolve())
    common = {**_extends(path, raw, chain)}
    common.update({k: _expand(v) for k, v in _mapping(raw.get("set"), f"{path}: set").items()})
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


def _params_dict(params_path: Path) -> dict:
    raw = read_yaml(Path(params_path), "params", ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {params_path} must be a mapping of params")
    return raw


def validate(profile: Profile, params_path: Path = Path("params.yaml")) -> dict[str, object]:
    """Each arm's params as the pipeline would load them; a bad key, a name DVC cannot take or a value
    `-S` cannot carry names the profile and arm. Nothing is run."""
    base = _params_dict(params_path)
    known = set(flatten(base))
    out = {}
    for arm in profile.arms:
        check_arm_name(arm.name, profile.path)
        try:
            out[arm.name] = params_from_dict(apply_overrides(base, arm.overrides))
            _flags(arm, known)
        except UserError as exc:
            raise UserError(f"{profile.path}: arm {arm.name}: {exc}") from None
    return out


def _hydra_str(text: str) -> str:
    """`text` in Hydra's override grammar: as it is when Hydra reads it back as that string, else quoted."""
    if "${" in text or _CONTROL.search(text):
        what = "an interpolation '${'" if "${" in text else "a control character (newline, tab, ...)"
        raise UserError(f"the string {text!r} holds {what}, which `dvc exp run -S` cannot carry as it is")
    if _PLAIN.fullmatch(text) and text.lower() not in _NOT_STRINGS:
        return text
    # Quoted: backslashes are literal except before a quote (or the closing quote), where they pair up.
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def hydra_value(value: object) -> str:
    """A params value as `dvc exp run -S key=VALUE` takes it (Hydra's override grammar, not YAML): read
    back as the same value, never as a sweep (`a,b`), a function (`f(x)`) or an interpolation; UserError
    for what that grammar cannot carry."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf, -inf and nan are Hydra's words too
    if isinstance(value, str):
        return _hydra_str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        bad = [k for k in value if not (isinstance(k, str) and _DICT_KEY.fullmatch(k))]
        if bad:
            raise UserError(
                f"the mapping key {bad[0]!r} cannot be written in `dvc exp run -S` (letters, digits, _ and -)"
            )
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise UserError(f"the value {value!r} ({type(value).__name__}) cannot be written in `dvc exp run -S`")


def _flags(arm: Arm, known: set[str]) -> list[str]:
    flags = []
    for key, value in arm.overrides.items():
        if not all(_KEY_PART.fullmatch(part) for part in key.split(".")):
            raise UserError(
                f"the key {key!r} cannot be given to `dvc exp run -S` (each dotted part: letters, digits, _ and -, "
                "not starting with a digit or '-')"
            )
        try:
            text = hydra_value(value)
        except UserError as exc:
            raise UserError(f"'{key}': {exc}") from None
        flags += ["-S", f"{'' if key in known else '++'}{key}={text}"]
    return flags


def set_flags(arm: Arm, params_path: Path = Path("params.yaml")) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`; `++key` where params.yaml lacks the key. Values are
    written in DVC's override grammar (hydra_value); UserError for one it cannot carry."""
    return _flags(arm, set(flatten(_params_dict(params_path))))


def queue_commands(profile: Profile, arms: list[str] | None = None) -> list[list[str]]:
    """The `dvc exp run --queue` command of each arm (all arms, or those named)."""
    chosen = [profile.arm(n) for n in arms] if arms else profile.arms
    for a in chosen:
        check_arm_name(a.name, profile.path)
    return [["dvc", "exp", "run", "--queue", "-n", a.name, *set_flags(a)] for a in chosen]


def check_profiles(profiles: list[Profile], params_path: Path = Path("params.yaml")) -> None:
    """validate() every profile, and no arm name in two of them (queueing the second would remove the
    first's experiment): all before the first is queued."""
    seen: dict[str, Path] = {}
    for profile in profiles:
        validate(profile, params_path)
        for arm in profile.arms:
            if arm.name in seen and seen[arm.name] != profile.path:
                raise UserError(
                    f"{profile.path}: arm {arm.name} is also an arm of {seen[arm.name]}; queueing both would "
                    "replace one experiment with the other: rename one"
                )
            seen[arm.name] = profile.path


def queue(profile: Profile, arms: list[str] | None = None, dry_run: bool = False, echo=print) -> list[str]:
    """Validate, remove same-named experiments, queue each arm; returns the queued names.

    Every arm is validated and every command built before the first is run; a `dvc exp run --queue`
    that fails is one line naming the arm and what was queued before it."""
    validate(profile)
    commands = queue_commands(profile, arms)
    queued: list[str] = []
    for cmd in commands:
        name = cmd[cmd.index("-n") + 1]
        echo(shlex.join(cmd))
        if dry_run:
            continue
        # `dvc exp remove a b` removes nothing when one is missing: one name at a time, after `--` so that
        # argparse reads it as a name whatever it looks like (validated above too).
        subprocess.run(["dvc", "exp", "remove", "--", name], capture_output=True)
        if subprocess.run(cmd).returncode != 0:
            raise UserError(
                f"{profile.path}: `dvc exp run --queue` failed for arm {name} (see above); "
                f"queued before it: {', '.join(queued) or 'none'}"
            )
        queued.append(name)
    return [cmd[cmd.index("-n") + 1] for cmd in commands]
