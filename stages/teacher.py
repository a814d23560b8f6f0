"""DVC stage `teacher`: the teacher named by teacher.source -> models/teacher/ (teacher.pth, teacher.json).

The sources (swinir, checkpoint, pan, dctlsa, train) are the table in sharpkd/teachers.py; the further
teachers of an ensemble (teacher.ensemble) go to models/teacher/members/<source>/, and teacher.json
records them and teacher.self_ensemble: what sharpkd.models.teacher_loader.load_teacher reads back.
"""

from __future__ import annotations

from sharpkd.config import Params
from sharpkd.files import atomic_dir
from sharpkd.models.teacher_loader import member_folder, save_teacher
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.teachers import obtain_members, obtain_teacher


def run(params: Params, paths: StagePaths, tracker) -> dict:
    scale, source = params.data.scale, params.teacher.source
    obtained = obtain_teacher(params, paths.pairs, tracker)
    members = obtain_members(params, paths.pairs, tracker)
    with atomic_dir(paths.teacher) as tmp:
        saved = [save_teacher(member_folder(tmp, s), *m, source=s, scale=scale) for s, m in members]
        info = save_teacher(
            tmp,
            *obtained,
            source=source,
            scale=scale,
            feature_layers=params.teacher.feature_layers,
            members=saved,
            self_ensemble=params.teacher.self_ensemble,
        )
    print(
        f"[teacher] {info['name']}, x{scale}, from {', '.join([source, *params.teacher.ensemble])}: "
        f"{info['total_params']:,} params, {info['passes']} passes per input -> {paths.teacher}"
    )
    tracker.log_metrics({"teacher.params": info["total_params"]})
    tracker.set_tags({"teacher.architecture": info["name"]})
    return info


if __name__ == "__main__":
    run_stage("teacher", run)
