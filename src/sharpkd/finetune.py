"""Fine-tuning from a trained student (`student.init`): which file it names, whether it fits params.student,
and the student started from it. Used by check_params (a wrong size stops before any output is replaced)
and distill."""

from __future__ import annotations

from pathlib import Path

import torch

from sharpkd.config import Params
from sharpkd.deploy import zoo
from sharpkd.errors import UserError
from sharpkd.fetch import file_digest
from sharpkd.models.rep import RepConv3x3
from sharpkd.models.student import Student, load_student


def init_source(params: Params) -> tuple[Path, str] | None:
    """(file, sha256) of the folded student `student.init` names (a zoo student is verified against its
    card); None for random weights."""
    init = params.student.init
    if not init:
        return None
    if zoo.is_zoo(init):
        found = zoo.zoo_file(init, "pth")
        return found.path, found.sha256
    path = Path(init).expanduser()
    return path, file_digest(path)


def check_init(params: Params) -> Student | None:
    """The student `student.init` names, loaded, if its architecture is params.student's; a mismatch is one
    line naming the keys to set. Run by check_params too, before any output is replaced."""
    source = init_source(params)
    if source is None:
        return None
    init = load_student(source[0])
    want = {
        "scale": params.data.scale,
        **{k: getattr(params.student, k) for k in ("channels", "blocks", "activation")},
    }
    have = init.arch_kwargs()
    keys = {"scale": "data.scale", "channels": "student.channels", "blocks": "student.blocks"}
    keys["activation"] = "student.activation"
    wrong = [f"{key}={have[k]}" for k, key in keys.items() if have[k] != want[k]]
    if wrong:
        raise UserError(
            f"params: 'student.init' = {params.student.init!r} is a {have['channels']} x {have['blocks']} "
            f"{have['activation']} student at x{have['scale']}, not params.student's {want['channels']} x "
            f"{want['blocks']} {want['activation']} at x{want['scale']}: set {' '.join(wrong)}"
        )
    return init


@torch.no_grad()
def init_from(student: Student, params: Params) -> None:
    """Start `student` from the folded student `student.init` names: a plain student takes its weights, a rep
    student's blocks are set to compute the same convs (RepConv3x3.load_folded), so step 0 is that student."""
    init = check_init(params)
    if init is None:
        return
    folded = init.state_dict()
    for name, module in student.named_modules():
        if isinstance(module, RepConv3x3):
            module.load_folded(folded[f"{name}.weight"], folded[f"{name}.bias"])
    plain = {k: v for k, v in folded.items() if k in student.state_dict()}
    student.load_state_dict(plain, strict=False)
    print(f"[distill] starting from {params.student.init} (sha256 {init_source(params)[1][:12]})")
