"""params.yaml -> typed, validated config.

Every group of params.yaml is a dataclass below. Loading checks each key against
the dataclass: an unknown key, a missing key, a wrong type or an out-of-range value raises
ConfigError naming the dotted key and what is allowed, so `dvc exp run -S
loss.perceptul=0.1` fails at once instead of silently doing nothing. The dataclasses hold
no default values: params.yaml is the one source of values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sharpkd.errors import UserError


class ConfigError(UserError):
    """A params.yaml problem; the message names the key."""


def _range(lo: float | None = None, hi: float | None = None) -> dict:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class Div2kParams:
    base_url: str
    train_count: int = field(metadata=_range(1, 800))
    valid_count: int = field(metadata=_range(1, 100))
    cache_dir: str


@dataclass(frozen=True)
class FolderParams:
    train: str
    valid: str


@dataclass(frozen=True)
class SamplesParams:
    valid_count: int = field(metadata=_range(1, 6))  # of the 7 bundled photos; at least one trains


@dataclass(frozen=True)
class TeacherOnlyParams:
    """Teacher-only inputs (no HR; the teacher's output is their only target), see data/teacher_only.py."""

    folder: str  # folder (recursive) of low-resolution images and video clips without an HR version
    frames_per_clip: int = field(metadata=_range(1, None))  # frames sampled from each clip of the folder
    upcycle: tuple[Literal["zoom_in", "zoom_out"], ...]  # the labelled images reused as teacher inputs
    max_side: int = field(metadata=_range(0, None))  # centre crop of each teacher-only input


@dataclass(frozen=True)
class DataParams:
    source: Literal["samples", "folder", "div2k"]
    scale: Literal[2, 3, 4]
    min_side: int = field(metadata=_range(1, None))  # degrade skips training images with a shorter side
    patch_size: int = field(metadata=_range(8, 1024))  # training crops: read by the stages that train
    valid_max_side: int = field(metadata=_range(0, None))
    div2k: Div2kParams
    folder: FolderParams
    samples: SamplesParams
    teacher_only: TeacherOnlyParams


@dataclass(frozen=True)
class DegradationParams:
    downscale: Literal["bicubic", "bilinear"]
    upscale: Literal["bicubic", "bilinear"]
    jpeg_prob: float = field(metadata=_range(0, 1))
    jpeg_quality: tuple[int, int]
    blur_prob: float = field(metadata=_range(0, 1))
    blur_sigma: tuple[float, float]
    noise_prob: float = field(metadata=_range(0, 1))
    noise_sigma: tuple[float, float]


@dataclass(frozen=True)
class TeacherTrainParams:
    channels: int = field(metadata=_range(4, 512))
    blocks: int = field(metadata=_range(1, 64))
    steps: int = field(metadata=_range(1, None))
    batch_size: int = field(metadata=_range(1, 4096))
    lr: float = field(metadata=_range(1e-8, 1))
    warmup_steps: int = field(metadata=_range(0, None))
    grad_clip: float = field(metadata=_range(0, None))
    eval_every: int = field(metadata=_range(1, None))


# The pretrained sources of teachers.TEACHER_SOURCES: what teacher.ensemble may list (fetched at data.scale).
ENSEMBLE_SOURCES = ("swinir", "pan", "dctlsa")


@dataclass(frozen=True)
class TeacherParams:
    source: Literal["swinir", "checkpoint", "pan", "dctlsa", "train"]
    checkpoint: str
    ensemble: tuple[str, ...]  # further pretrained teachers (ENSEMBLE_SOURCES) averaged with source's output
    self_ensemble: bool  # each teacher on the 8 flips/rotations of the input, turned back, averaged
    feature_layers: tuple[str, ...]
    feature_channels: int = field(metadata=_range(0, 4096))
    train: TeacherTrainParams


@dataclass(frozen=True)
class CacheParams:
    batch_size: int = field(metadata=_range(1, 4096))
    max_gb: float = field(metadata=_range(0, None))
    pca_crops: int = field(metadata=_range(1, 100000))  # LR crops the feature projection is fitted on
    pca_crop: int = field(metadata=_range(4, 1024))  # their side, in LR pixels


@dataclass(frozen=True)
class InferParams:
    tile: int = field(metadata=_range(16, 8192))
    overlap: int = field(metadata=_range(0, 1024))


@dataclass(frozen=True)
class LossParams:
    pixel: float = field(metadata=_range(0, None))
    kd: float = field(metadata=_range(0, None))
    perceptual: float = field(metadata=_range(0, None))
    perceptual_target: Literal["teacher", "hr"]
    perceptual_layers: tuple[str, ...]
    feature: float = field(metadata=_range(0, None))
    feature_affinity: float = field(metadata=_range(0, None))


@dataclass(frozen=True)
class StudentParams:
    channels: int = field(metadata=_range(4, 512))
    blocks: int = field(metadata=_range(1, 64))
    activation: Literal["relu", "prelu", "silu", "gelu"]
    block: Literal["plain", "rep"]  # rep: re-parameterised training blocks, folded into plain ones
    rep_expand: float = field(metadata=_range(0, 8))  # width of the rep 1x1->3x3 branch, x out channels
    init: str  # "" = random; zoo:NAME or a student .pth of the same architecture to fine-tune from


@dataclass(frozen=True)
class DistillParams:
    steps: int = field(metadata=_range(1, None))
    batch_size: int = field(metadata=_range(1, 4096))
    lr: float = field(metadata=_range(1e-8, 1))
    weight_decay: float = field(metadata=_range(0, 1))
    warmup_steps: int = field(metadata=_range(0, None))
    grad_clip: float = field(metadata=_range(0, None))
    eval_every: int = field(metadata=_range(1, None))
    checkpoint_every: int = field(metadata=_range(1, None))
    teacher: bool  # false: the no-teacher baseline (the cache holds only the validation outputs)
    teacher_only_fraction: float = field(metadata=_range(0, 1))  # share of each batch
    ema: float = field(metadata=_range(0, 0.99999))  # decay of the weights' moving average (0 = none)
    keep: Literal["best", "last"]  # student.pth: the weights at the best validation PSNR, or the last ones


@dataclass(frozen=True)
class ComputeParams:
    """How the stages run, read by several of them (teacher, cache_teacher, distill, evaluate)."""

    amp: bool  # bf16 where native (CUDA; CPUs with AVX512-BF16/AMX): training passes, the teacher on CUDA
    threads: int = field(metadata=_range(0, 1024))  # torch CPU threads (0 = torch's default)


@dataclass(frozen=True)
class EvalParams:
    sets: dict[str, str]
    lpips: bool
    speed_repeats: int = field(metadata=_range(1, 1000))
    teacher_speed_repeats: int = field(metadata=_range(0, 1000))
    compare_images: int = field(metadata=_range(0, 100))
    crop: int = field(metadata=_range(16, 4096))


@dataclass(frozen=True)
class ExportParams:
    opset: int = field(metadata=_range(17, 30))
    fp16: bool
    parity_tol: float = field(metadata=_range(0, 1))
    speed_repeats: int = field(metadata=_range(1, 1000))
    int8: bool  # also an INT8 ONNX model (ONNX Runtime static quantisation)
    int8_calibration: int = field(metadata=_range(1, 4096))  # training crops it is calibrated on


@dataclass(frozen=True)
class WeightsParams:
    dir: str


@dataclass(frozen=True)
class TrackingParams:
    enabled: bool
    uri: str
    experiment: str
    registered_model: str


@dataclass(frozen=True)
class Params:
    seed: int = field(metadata=_range(0, 2**32 - 1))
    data: DataParams
    degradation: DegradationParams
    teacher: TeacherParams
    cache: CacheParams
    infer: InferParams
    loss: LossParams
    student: StudentParams
    distill: DistillParams
    compute: ComputeParams
    eval: EvalParams
    export: ExportParams
    weights: WeightsParams
    tracking: TrackingParams


# The groups that decide what the pipeline computes (tracking only records it).
PIPELINE_GROUPS = tuple(f.name for f in dataclasses.fields(Params) if f.name != "tracking")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values [{', '.join(_type_name(a) for a in args)}]"
    if origin is dict:
        return "a mapping of name -> " + _type_name(typing.get_args(tp)[1])
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass's form."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    wrong = ConfigError(f"params: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    convert = {Literal: _literal, tuple: _sequence, dict: _mapping}.get(typing.get_origin(tp), _scalar)
    return convert(value, tp, key, wrong)


def _literal(value: Any, tp: Any, key: str, wrong: ConfigError) -> Any:
    # Compare types too: bool is an int subclass (true == 1) and 4.0 == 4, neither may pass as the int 4.
    if not any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
        raise wrong
    return value


def _sequence(value: Any, tp: Any, key: str, wrong: ConfigError) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise wrong
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise wrong
    return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _mapping(value: Any, tp: Any, key: str, wrong: ConfigError) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise wrong
    vt = typing.get_args(tp)[1]
    return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}


def _scalar(value: Any, tp: Any, key: str, wrong: ConfigError) -> Any:
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise wrong
        return value
    if tp not in (bool, int, float):
        raise TypeError(f"unsupported annotation {tp} for {key}")
    # bool is an int subclass: true is not the integer 1, nor a number; an int is not a bool.
    allowed = {bool: (bool,), int: (int,), float: (int, float)}[tp]
    if not isinstance(value, allowed) or (tp is not bool and isinstance(value, bool)):
        raise wrong
    if tp is float:
        if not math.isfinite(value):  # YAML's .nan would slip through every range check
            raise ConfigError(f"params: '{key}' must be a finite number, got {value!r}")
        return float(value)
    return value


# Keys that were renamed: an old `dvc exp run -S` command or params.yaml gets one line naming the new key.
RENAMED = {
    "data.unlabeled": "data.teacher_only.folder",
    "data.upcycle": "data.teacher_only.upcycle",
    "data.teacher_only_max_side": "data.teacher_only.max_side",
    "distill.unlabeled_fraction": "distill.teacher_only_fraction",
    "distill.amp": "compute.amp",
    "distill.threads": "compute.threads",
}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix or "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"params: '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        if key in RENAMED:
            raise ConfigError(f"params: '{key}' was renamed '{RENAMED[key]}'; use that key")
        raise ConfigError(f"params: unknown key '{key}'; allowed keys here: {', '.join(fields)}")
    missing = [name for name in fields if name not in raw]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(
            f"params: key '{key}' is missing; params.yaml must give every key (it is the one source of values)"
        )
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], key)
        lo, hi = fields[name].metadata.get("range", (None, None))
        if lo is not None and converted < lo or hi is not None and converted > hi:
            if lo is None:
                bounds = f"at most {hi}"
            elif hi is None:
                bounds = f"at least {lo}"
            else:
                bounds = f"between {lo} and {hi}"
            raise ConfigError(f"params: '{key}' must be {bounds}, got {value!r}")
        values[name] = converted
    return cls(**values)


# eval.sets names become the first part of flat metric keys (`Set5.student.psnr`): no dots, and no
# collision with the other top-level keys of metrics/eval.json.
SET_NAME = re.compile(r"[A-Za-z0-9_-]+")
RESERVED_SET_NAMES = {
    "valid",
    "student",
    "teacher",
    "bicubic",
    "timing",
    "speed",
    "speedup",
    "problems",
    "lpips_reason",
}


def _check_relations(p: Params) -> None:
    """Checks across keys, all made when params load (before any stage works)."""
    for name in p.eval.sets:
        if not SET_NAME.fullmatch(name) or name in RESERVED_SET_NAMES:
            raise ConfigError(
                f"params: 'eval.sets.{name}': a set name must be letters, digits, '-' or '_' "
                f"and not one of {', '.join(sorted(RESERVED_SET_NAMES))} (it becomes the prefix of the metric keys)"
            )
    s = p.data.scale
    if p.data.patch_size % s:
        raise ConfigError(
            f"params: 'data.patch_size' ({p.data.patch_size}) must be a multiple of data.scale ({s})"
        )
    if p.data.patch_size > p.data.min_side:
        raise ConfigError(
            f"params: 'data.patch_size' ({p.data.patch_size}) is larger than data.min_side ({p.data.min_side}): "
            "degrade would keep training images smaller than a crop; raise data.min_side too"
        )
    if p.data.source == "folder" and not p.data.folder.train:
        raise ConfigError(
            "params: 'data.folder.train' must name a folder of images when data.source is 'folder'"
        )
    if p.teacher.source == "checkpoint" and not p.teacher.checkpoint:
        raise ConfigError(
            "params: 'teacher.checkpoint' must be a file path when teacher.source is 'checkpoint'"
        )
    if p.infer.overlap * 2 >= p.infer.tile:
        raise ConfigError(
            f"params: 'infer.overlap' ({p.infer.overlap}) must be less than half of infer.tile ({p.infer.tile})"
        )
    for key, (lo, hi) in {
        "degradation.jpeg_quality": p.degradation.jpeg_quality,
        "degradation.blur_sigma": p.degradation.blur_sigma,
        "degradation.noise_sigma": p.degradation.noise_sigma,
    }.items():
        if lo > hi or lo < 0:
            raise ConfigError(f"params: '{key}' must be [low, high] with 0 <= low <= high, got [{lo}, {hi}]")
    if not 1 <= p.degradation.jpeg_quality[0] <= p.degradation.jpeg_quality[1] <= 100:
        raise ConfigError("params: 'degradation.jpeg_quality' values must be between 1 and 100")
    _check_ensemble(p)
    _check_teacher_use(p)
    _check_folders(p)
    _check_init(p)


def _check_init(p: Params) -> None:
    """student.init names a zoo student or a .pth file; which zoo students exist, and whether the file is
    params.student's size, check_params checks (finetune.check_init), which can read them."""
    init = p.student.init
    if not init or init.startswith("zoo:"):
        return
    if not init.endswith(".pth"):
        raise ConfigError(
            f"params: 'student.init' = {init!r}: give zoo:NAME (`sharpkd zoo` lists them) or a student .pth "
            "(models/student/student.pth of an earlier run)"
        )
    if not Path(init).expanduser().is_file():
        raise ConfigError(f"params: 'student.init' = {init!r}: no such file")


def _check_ensemble(p: Params) -> None:
    ensemble, source = p.teacher.ensemble, p.teacher.source
    for name in ensemble:
        if name not in ENSEMBLE_SOURCES:
            raise ConfigError(
                f"params: 'teacher.ensemble' lists {name!r}: its members must be pretrained teachers, one of "
                f"{', '.join(ENSEMBLE_SOURCES)} (train and checkpoint only as teacher.source)"
            )
    if source in ensemble:
        raise ConfigError(
            f"params: 'teacher.ensemble' lists {source!r}, which is teacher.source already: list only the "
            "further teachers"
        )
    if len(set(ensemble)) != len(ensemble):
        raise ConfigError(f"params: 'teacher.ensemble' lists a teacher twice: {list(ensemble)}")


# What the stages write, relative to the repository root they run in (docs/architecture.md).
OUTPUT_FOLDERS = ("data", "models", "metrics")


def _input_folders(p: Params) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(key, folder) of the image folders params name that are read: (trained on, validated / evaluated on)."""
    train = [("data.teacher_only.folder", p.data.teacher_only.folder)]
    held_out = [(f"eval.sets.{name}", folder) for name, folder in p.eval.sets.items()]
    if p.data.source == "folder":
        train.append(("data.folder.train", p.data.folder.train))
        held_out.append(("data.folder.valid", p.data.folder.valid))
    return [(k, f) for k, f in train if f], [(k, f) for k, f in held_out if f]


def _real(folder: str) -> Path:
    """Where `folder` is, as the stages resolve it (from the working directory, `~` expanded), links
    followed. Path work only: nothing is listed, a missing folder is fine (degrade and evaluate check)."""
    return Path(os.path.realpath(Path(folder).expanduser()))


def _overlap(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def _check_folders(p: Params) -> None:
    """No input folder inside (or around) the pipeline's outputs, none trained on inside (or around) one
    validated or evaluated on: either would feed the validation split or the teacher's outputs to the
    student silently."""
    train, held_out = ([(key, folder, _real(folder)) for key, folder in side] for side in _input_folders(p))
    outputs = [(name, _real(name)) for name in OUTPUT_FOLDERS]
    for key, folder, real in train + held_out:
        for name, out in outputs:
            if _overlap(real, out):
                raise ConfigError(
                    f"params: '{key}' = {folder!r} overlaps the pipeline's output folder {name}/ ({out}): its "
                    "images would include what the stages write (the validation split, the teacher's outputs); "
                    "use a folder outside data/, models/ and metrics/"
                )
    for key, folder, real in train:
        for other, held, held_real in held_out:
            if _overlap(real, held_real):
                raise ConfigError(
                    f"params: '{key}' = {folder!r} overlaps '{other}' = {held!r}: images the student is "
                    "validated or evaluated on would be trained on; use folders that do not contain each other"
                )


def check_linked_files(p: Params, key: str, files: list[Path]) -> None:
    """_check_folders' rule for the files a training folder holds (degrade lists them; params loading
    stays path work): a file that resolves (a link) into the pipeline's outputs or a held-out folder is
    refused, naming it, as such a folder is."""
    _, held_out = _input_folders(p)
    banned = [(f"the pipeline's output folder {name}/", _real(name)) for name in OUTPUT_FOLDERS]
    banned += [(f"'{other}' = {folder!r}", _real(folder)) for other, folder in held_out]
    for path in files:
        real = _real(str(path))
        for what, folder in banned:
            if real.is_relative_to(folder):
                raise ConfigError(
                    f"params: '{key}' holds {str(path)!r}, a link to {str(real)!r} inside {what}: images the "
                    "student is validated or evaluated on, or what the stages write, would be trained on; "
                    "remove the link or copy the file"
                )


def _check_teacher_use(p: Params) -> None:
    """The teacher-only data and the no-teacher baseline: every knob that would be silently ignored is an error."""
    to = p.data.teacher_only
    teacher_only = [
        k
        for k, on in (("data.teacher_only.folder", to.folder), ("data.teacher_only.upcycle", to.upcycle))
        if on
    ]
    if len(set(to.upcycle)) != len(to.upcycle):
        raise ConfigError(f"params: 'data.teacher_only.upcycle' lists a value twice: {list(to.upcycle)}")
    f = p.distill.teacher_only_fraction
    if f > 0 and not teacher_only:
        raise ConfigError(
            f"params: 'distill.teacher_only_fraction' is {f} but there is no teacher-only data: set "
            "data.teacher_only.folder to a folder of low-resolution images, or data.teacher_only.upcycle to "
            "[zoom_in], [zoom_out] or both"
        )
    if teacher_only and f == 0:
        raise ConfigError(
            f"params: {' and '.join(teacher_only)} given but 'distill.teacher_only_fraction' is 0: those images "
            "would be prepared and cached but never trained on; set distill.teacher_only_fraction (e.g. 0.25)"
        )
    if not p.distill.teacher:
        uses = [
            f"{k}={v}"
            for k, v in (
                ("loss.kd", p.loss.kd),
                ("loss.feature", p.loss.feature),
                ("loss.feature_affinity", p.loss.feature_affinity),
                ("distill.teacher_only_fraction", f),
            )
            if v > 0
        ]
        if p.loss.perceptual > 0 and p.loss.perceptual_target == "teacher":
            uses.append("loss.perceptual_target=teacher")
        if uses:
            raise ConfigError(
                f"params: 'distill.teacher' is false (the student learns from HR alone) but {', '.join(uses)} "
                "need the teacher; set them to 0 (perceptual_target to hr), or distill.teacher to true"
            )


def params_from_dict(raw: Any) -> Params:
    params = _build(Params, raw, "")
    _check_relations(params)
    return params


# Bounds of the YAML files the project reads (params.yaml, profiles, MLmodel): a few KB and a few hundred
# values each. Aliases are counted as the values they stand for, so a "billion laughs" (aliases of
# aliases) is refused while it is still a small node graph, before anything is expanded.
YAML_MAX_BYTES = 4 * 2**20
YAML_MAX_VALUES = 100_000


class YamlRefused(yaml.YAMLError):
    """A YAML text the project will not read: a duplicate key, too many values, a self-reference."""


def _expanded_values(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for with every alias written out (memoised: linear in the graph)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise YamlRefused(f"the alias on line {node.start_mark.line + 1} refers to a value that holds it")
    open_.add(id(node))
    children: list = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _expanded_values(child, memo, open_)
        if total > YAML_MAX_VALUES:
            raise YamlRefused(
                f"it stands for more than {YAML_MAX_VALUES} values once its aliases are written out "
                "(aliases of aliases: a YAML 'billion laughs'?); write the values out"
            )
    open_.discard(id(node))
    memo[id(node)] = total
    return total


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently) and
    a document whose aliases expand past YAML_MAX_VALUES values."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _expanded_values(node, {}, set())
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader names it
                    continue
                if first is not None:
                    raise YamlRefused(
                        f"the key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1}); "
                        "give each key once"
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats without a dot (`1e-05`): DVC (ruamel) writes `dvc exp run -S distill.lr=1e-5` so, and
# PyYAML (YAML 1.1) would read it back as a string.
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml_text(text: str) -> Any:
    """YAML text as StrictLoader reads it (a refused text is YamlRefused; bad YAML is yaml.YAMLError)."""
    if len(text) > YAML_MAX_BYTES:
        raise YamlRefused(f"it is larger than {YAML_MAX_BYTES // 2**20} MiB")
    try:
        return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader
    except RecursionError:
        raise YamlRefused("it is nested too deeply") from None


def read_yaml(path: Path, what: str, error: type[UserError] = UserError, hint: str = "") -> Any:
    """A YAML file's content; a missing, malformed or refused file (StrictLoader, the size bound) is
    `error` naming `what` and the path."""
    if not path.is_file():
        raise error(f"{what}: {path} not found{hint}")
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise error(
            f"{what}: {path} is {size} bytes; a YAML file the project reads is at most {YAML_MAX_BYTES}"
        )
    try:
        return load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except YamlRefused as exc:
        raise error(f"{what}: {path} is refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{what}: {path} is not valid YAML: {exc}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = read_yaml(path, "params", ConfigError, " (run from the repository root)")
    if raw is None:
        raise ConfigError(
            f"params: {path} is empty; it must give every key (see the repository's params.yaml)"
        )
    return params_from_dict(raw)


def flatten(params: Params | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys, the names `dvc exp run -S` uses (lists kept as lists)."""
    d = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else params
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out
