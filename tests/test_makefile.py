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


def queued_arms(*make_args: str) -> dict[str, list[str]]:
    """arm name -> its `-S` overrides, from the commands `make -n` prints."""
    out = subprocess.run(
        ["make", "-n", "-s", *make_args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    arms = {}
    for command in re.split(r"&&|\n", out.replace("\\\n", " ")):
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
    for name, p in params.items():
        assert set(p.eval.sets) == {"Set5", "Manga109"}, name
        assert p.distill.steps == 24000 and p.distill.batch_size == 32, name
    # The reference pins the plain 32 x 4 student its tables were measured with; the domain arm adds
    # the unlabeled Manga109 pages to the same recipe.
    assert all(p.student.block == "plain" and p.student.channels == 32 for p in params.values())
    if target == "queue-domain":
        assert set(params) == {"dom-manga"}
        assert params["dom-manga"].data.unlabeled.endswith("unlabeled_x4")
        assert params["dom-manga"].distill.unlabeled_fraction > 0
    else:
        assert set(params) == {"ref-baseline", "ref-distill", "ref-upcycle"}
        assert not params["ref-baseline"].distill.teacher and params["ref-distill"].distill.teacher
        assert tuple(params["ref-upcycle"].data.upcycle) == ("zoom_out",)


def test_a_misspelt_override_is_caught():
    with pytest.raises(ConfigError, match="distill.warmup_step"):
        apply_overrides(["distill.warmup_step=300"])
