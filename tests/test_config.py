"""params.yaml -> typed, validated Params (issue 2, point 4): every bad key is an error that names it."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from helpers import deep_update, repo_params_dict
from sharpkd.config import ConfigError, Params, flatten, load_params, params_from_dict
from sharpkd.errors import UserError

GROUPS = ("seed", "data", "degradation", "teacher", "loss", "student", "distill", "eval", "export", "weights")


def _with(**override) -> dict:
    return deep_update(repo_params_dict(), override)


def test_repo_params_yaml_is_valid_and_complete():
    raw = repo_params_dict()
    params = params_from_dict(raw)
    assert set(GROUPS) <= set(raw)
    # Every knob of the dataclasses is spelled out in params.yaml (nothing hides behind a default).
    assert set(flatten(raw)) == set(flatten(params))
    assert params.data.scale in (2, 3, 4) and params.data.patch_size % params.data.scale == 0
    assert isinstance(params.degradation.jpeg_quality, tuple)


def test_load_params_reads_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with(seed=7, data={"scale": 2, "patch_size": 64})))
    params = load_params(tmp_path / "params.yaml")
    assert params.seed == 7 and params.data.scale == 2 and params.data.patch_size == 64


def test_params_yaml_is_the_one_source_of_values(tmp_path):
    """No dataclass holds a default: a missing key, group or file is an error naming it."""
    todo = [Params]
    while todo:
        cls = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
            if dataclasses.is_dataclass(hints[f.name]):
                todo.append(hints[f.name])
    raw = repo_params_dict()
    del raw["distill"]["steps"]
    with pytest.raises(ConfigError, match=r"key 'distill.steps' is missing"):
        params_from_dict(raw)
    raw = repo_params_dict()
    del raw["eval"]
    with pytest.raises(ConfigError, match=r"key 'eval' is missing"):
        params_from_dict(raw)
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty"):
        load_params(tmp_path / "empty.yaml")


def test_cross_key_checks_happen_at_load():
    with pytest.raises(ConfigError, match=r"eval.sets.valid"):
        params_from_dict(_with(eval={"sets": {"valid": "x"}}))
    with pytest.raises(ConfigError, match=r"data.samples.valid_count"):
        params_from_dict(_with(data={"samples": {"valid_count": 7}}))


def test_params_are_frozen():
    params = params_from_dict(repo_params_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.data.scale = 2  # type: ignore[misc]


def test_flatten_gives_dvc_dotted_keys():
    flat = flatten(params_from_dict(repo_params_dict()))
    assert flat["data.div2k.train_count"] == 800
    assert flat["degradation.jpeg_quality"] == [70, 95]  # lists, as `dvc exp run -S` writes them
    assert flat["teacher.train.steps"] == repo_params_dict()["teacher"]["train"]["steps"]


@pytest.mark.parametrize(
    ("override", "key", "says"),
    [
        # unknown keys, top level and nested: the message lists what is allowed there
        ({"sead": 1}, "'sead'", "allowed keys here: seed, data"),
        ({"loss": {"perceptul": 0.1}}, "'loss.perceptul'", "perceptual"),
        ({"data": {"div2k": {"train_cont": 5}}}, "'data.div2k.train_cont'", "train_count"),
        # wrong types
        ({"data": {"patch_size": "96"}}, "'data.patch_size'", "an integer"),
        ({"data": {"patch_size": 96.0}}, "'data.patch_size'", "an integer"),
        ({"distill": {"lr": "fast"}}, "'distill.lr'", "a number"),
        ({"degradation": {"jpeg_quality": 80}}, "'degradation.jpeg_quality'", "a list of 2 values"),
        ({"degradation": {"jpeg_quality": [70, 80, 90]}}, "'degradation.jpeg_quality'", "a list of 2 values"),
        ({"degradation": {"jpeg_quality": [70, 80.5]}}, "'degradation.jpeg_quality[1]'", "an integer"),
        ({"teacher": {"feature_layers": "body.0"}}, "'teacher.feature_layers'", "a list of a string"),
        ({"eval": {"sets": ["Set5"]}}, "'eval.sets'", "a mapping"),
        ({"data": 5}, "'data'", "must be a mapping"),
        ({"data": {"folder": {"train": 12}}}, "'data.folder.train'", "a string"),
        # bool is not an int, an int is not a bool
        ({"seed": True}, "'seed'", "an integer"),
        ({"data": {"teacher_only": {"max_side": False}}}, "'data.teacher_only.max_side'", "an integer"),
        ({"compute": {"amp": 1}}, "'compute.amp'", "true or false"),
        ({"distill": {"lr": True}}, "'distill.lr'", "a number"),
        # Literal values: the allowed ones are listed, and type matters (4.0 and true are not 4)
        ({"data": {"source": "imagenet"}}, "'data.source'", "one of 'samples', 'folder', 'div2k'"),
        ({"data": {"scale": 5}}, "'data.scale'", "one of 2, 3, 4"),
        ({"data": {"scale": 4.0}}, "'data.scale'", "one of 2, 3, 4"),
        ({"data": {"scale": "4"}}, "'data.scale'", "one of 2, 3, 4"),
        ({"degradation": {"downscale": "lanczos"}}, "'degradation.downscale'", "'bicubic', 'bilinear'"),
        ({"student": {"activation": "tanh"}}, "'student.activation'", "'relu', 'prelu', 'silu', 'gelu'"),
        # out of range
        ({"degradation": {"jpeg_prob": 1.5}}, "'degradation.jpeg_prob'", "between 0 and 1"),
        ({"data": {"patch_size": 4}}, "'data.patch_size'", "between 8 and 1024"),
        ({"data": {"div2k": {"train_count": 801}}}, "'data.div2k.train_count'", "between 1 and 800"),
        ({"data": {"div2k": {"valid_count": 0}}}, "'data.div2k.valid_count'", "between 1 and 100"),
        ({"seed": -1}, "'seed'", "between 0 and"),
        ({"loss": {"kd": -0.5}}, "'loss.kd'", "at least 0"),
        ({"distill": {"lr": float("nan")}}, "'distill.lr'", "finite"),
        # relations between keys
        ({"data": {"scale": 3, "patch_size": 64}}, "'data.patch_size'", "multiple of data.scale"),
        (
            {"data": {"patch_size": 128}},
            "'data.patch_size' (128) is larger than data.min_side",
            "raise data.min_side",
        ),
        # renamed keys: an old -S command gets the new name
        ({"data": {"unlabeled": "/x"}}, "'data.unlabeled' was renamed", "'data.teacher_only.folder'"),
        (
            {"distill": {"unlabeled_fraction": 0.5}},
            "'distill.unlabeled_fraction' was renamed",
            "teacher_only_fraction",
        ),
        ({"distill": {"amp": False}}, "'distill.amp' was renamed", "'compute.amp'"),
        ({"degradation": {"jpeg_quality": [95, 70]}}, "'degradation.jpeg_quality'", "low <= high"),
        ({"degradation": {"jpeg_quality": [0, 50]}}, "'degradation.jpeg_quality'", "between 1 and 100"),
        ({"degradation": {"noise_sigma": [-1.0, 5.0]}}, "'degradation.noise_sigma'", "0 <= low"),
        ({"infer": {"tile": 64, "overlap": 32}}, "'infer.overlap'", "less than half"),
        ({"data": {"source": "folder"}}, "'data.folder.train'", "folder of images"),
        ({"teacher": {"source": "checkpoint"}}, "'teacher.checkpoint'", "file path"),
        # teacher-only data and the no-teacher baseline: a knob that would be ignored is an error
        (
            {"distill": {"teacher_only_fraction": 0.25}},
            "'distill.teacher_only_fraction'",
            "no teacher-only data",
        ),
        (
            {"data": {"teacher_only": {"upcycle": ["zoom_in"]}}},
            "'distill.teacher_only_fraction' is 0",
            "never trained",
        ),
        ({"data": {"teacher_only": {"folder": "/x"}}}, "data.teacher_only.folder given", "never trained on"),
        (
            {"data": {"teacher_only": {"upcycle": ["zoom_in", "zoom_in"]}}},
            "'data.teacher_only.upcycle'",
            "twice",
        ),
        (
            {"data": {"teacher_only": {"upcycle": ["zoom"]}}},
            "'data.teacher_only.upcycle[0]'",
            "'zoom_in', 'zoom_out'",
        ),
        ({"distill": {"teacher": False}}, "'distill.teacher' is false", "loss.kd=1.0"),
        (
            {"distill": {"teacher": False}, "loss": {"kd": 0.0, "perceptual": 0.1}},
            "'distill.teacher' is false",
            "loss.perceptual_target=teacher",
        ),
        (
            {
                "distill": {"teacher": False, "teacher_only_fraction": 0.5},
                "loss": {"kd": 0.0},
                "data": {"teacher_only": {"upcycle": ["zoom_out"]}},
            },
            "'distill.teacher' is false",
            "distill.teacher_only_fraction=0.5",
        ),
    ],
)
def test_bad_params_name_the_key(override, key, says):
    with pytest.raises(ConfigError) as err:
        params_from_dict(_with(**override))
    message = str(err.value)
    assert key in message and says in message, message
    assert message.count("\n") == 0  # one line: run_stage prints it as is
    assert isinstance(err.value, UserError)


def test_teacher_only_and_baseline_params_that_fit():
    p = params_from_dict(
        _with(
            data={"teacher_only": {"upcycle": ["zoom_in", "zoom_out"]}},
            distill={"teacher_only_fraction": 0.25},
        )
    )
    assert p.data.teacher_only.upcycle == ("zoom_in", "zoom_out") and p.distill.teacher_only_fraction == 0.25
    # The no-teacher baseline: no term that needs the teacher.
    p = params_from_dict(_with(distill={"teacher": False}, loss={"kd": 0.0, "feature": 0.0}))
    assert p.distill.teacher is False
    # A folder is not looked at when params load (sharpkd sharpen / ui load params too): degrade checks it.
    p = params_from_dict(
        _with(data={"teacher_only": {"folder": "/no/such/folder"}}, distill={"teacher_only_fraction": 0.5})
    )
    assert p.data.teacher_only.folder == "/no/such/folder"


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: {scale: 4\n")
    with pytest.raises(ConfigError, match=r"params.yaml is not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_non_string_unknown_keys_are_reported():
    raw = _with()
    raw[1] = "x"
    raw["zzz"] = "y"
    with pytest.raises(ConfigError, match="unknown key '1'"):
        params_from_dict(raw)


def test_accepted_conversions():
    params = params_from_dict(
        _with(
            distill={"lr": 1},  # an int is a fine float
            data={"folder": {"train": None}},  # YAML's empty value is ""
            eval={"sets": None, "lpips": False},
            teacher={"feature_layers": ["a", "b"]},
        )
    )
    assert params.distill.lr == 1.0 and isinstance(params.distill.lr, float)
    assert params.data.folder.train == ""
    assert params.eval.sets == {} and params.eval.lpips is False
    assert params.teacher.feature_layers == ("a", "b")
