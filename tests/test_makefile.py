"""The Makefile's experiment targets: every arm they queue is a valid params.yaml override set.

`make -n` prints the `dvc exp run --queue` commands without running them; each arm's `-S` overrides
are applied to params.yaml and validated as the pipeline would, so a misspelt key or a bad value in
the Makefile fails here rather than an hour into a queue.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from helpers import REPO
from sharpkd.config import ConfigError, params_from_dict


def dry_run(*make_args: str) -> str:
    """The commands `make -n` prints, continuation lines joined."""
    out = subprocess.run(
        ["make", "-n", "-s", *make_args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return out.replace("\\\n", " ")


def queued_arms(*make_args: str) -> dict[str, list[str]]:
    """arm name -> its `-S` overrides, from the commands `make -n` prints."""
    arms = {}
    for command in re.split(r"&&|\n", dry_run(*make_args)):
        words = shlex.split(command)
        if "--queue" in words:
            name = words[words.index("-n") + 1]
            arms[name] = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    return arms


def apply_overrides(overrides: list[str]):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)  # DVC's `++key` adds a key that params.yaml lacks
        *parents, leaf = key.removeprefix("++").split(".")
        target = params
        for part in parents:
            target = target[part]
        target[leaf] = yaml.safe_load(value)
    return params_from_dict(params)


def test_sweep_arms_are_named_and_set_as_asked():
    arms = queued_arms(
        "queue-sweep", "SWEEP_SIZES=64x5", "SWEEP_BLOCKS=rep plain", "SWEEP_REP_LR=0.001",
        "SWEEP_WARMUP=300", "SWEEP_TAG=-lr1e-3",
    )  # fmt: skip
    assert set(arms) == {"sweep-rep-64x5-lr1e-3", "sweep-plain-64x5-lr1e-3"}
    rep = apply_overrides(arms["sweep-rep-64x5-lr1e-3"])
    plain = apply_overrides(arms["sweep-plain-64x5-lr1e-3"])
    assert (rep.student.block, rep.student.channels, rep.student.blocks) == ("rep", 64, 5)
    assert (rep.distill.lr, rep.distill.warmup_steps) == (0.001, 300)
    assert plain.student.block == "plain" and plain.distill.lr == 0.002


@pytest.mark.parametrize("target", ["queue-reference", "queue-domain"])
def test_reference_and_domain_arms_are_valid_params(target):
    arms = queued_arms(target)
    assert arms, f"make -n {target} queued nothing"
    params = {name: apply_overrides(overrides) for name, overrides in arms.items()}
    default = apply_overrides([])
    for name, p in params.items():
        assert set(p.eval.sets) == {"Set5", "Manga109"}, name
        assert p.distill.steps == 24000 and p.distill.batch_size == 32, name
        # By default every arm trains params.yaml's student at its lr, named after it.
        assert p.student == default.student, name
        assert (p.distill.lr, p.distill.warmup_steps) == (
            default.distill.lr,
            default.distill.warmup_steps,
        ), name
        student = f"{default.student.block}{default.student.channels}x{default.student.blocks}"
        assert name.endswith(f"-{student}"), name
    by_arm = {name.rsplit("-", 1)[0]: p for name, p in params.items()}
    if target == "queue-domain":
        assert set(by_arm) == {"dom-manga"}
        assert by_arm["dom-manga"].data.unlabeled.endswith("unlabeled_x4")
        assert by_arm["dom-manga"].distill.unlabeled_fraction > 0
    else:
        assert set(by_arm) == {"ref-baseline", "ref-distill", "ref-upcycle"}
        assert not by_arm["ref-baseline"].distill.teacher and by_arm["ref-distill"].distill.teacher
        assert tuple(by_arm["ref-upcycle"].data.upcycle) == ("zoom_out",)


def test_reference_arms_of_another_student_are_named_after_it():
    arms = queued_arms(
        "queue-reference", "REF_BLOCK=plain", "REF_CHANNELS=32", "REF_BLOCKS=4", "REF_LR=0.002",
        "REF_WARMUP=30",
    )  # fmt: skip
    assert set(arms) == {"ref-baseline-plain32x4", "ref-distill-plain32x4", "ref-upcycle-plain32x4"}
    for overrides in arms.values():
        p = apply_overrides(overrides)
        assert (p.student.block, p.student.channels, p.student.blocks) == ("plain", 32, 4)
        assert (p.distill.lr, p.distill.warmup_steps) == (0.002, 30)


def test_a_misspelt_override_is_caught():
    with pytest.raises(ConfigError, match="distill.warmup_step"):
        apply_overrides(["distill.warmup_step=300"])


def test_results_takes_extra_arms():
    words = shlex.split(dry_run("results", 'REF_EXTRA_ARMS=ref-upcycle-rep64x5-f25="a quarter"'))
    arms = [w.split("=", 1)[0] for w in words if w.startswith("ref-")]
    # The three arms of make reference (named after params.yaml's student), then the extra one.
    assert [a.rsplit("-", 1)[0] for a in arms[:3]] == ["ref-baseline", "ref-distill", "ref-upcycle"]
    assert arms[3:] == ["ref-upcycle-rep64x5-f25"]
