"""DVC stage `teacher`: the teacher named by teacher.source -> models/teacher/ (teacher.pth, teacher.json).

The sources (swinir, checkpoint, pan, train) are the table in sharpkd/teachers.py; teacher.json is
what sharpkd.models.teacher.load_teacher reads back.
"""

from __future__ import annotations

import torch

from sharpkd.config import Params
from sharpkd.files import atomic_dir, write_json
from sharpkd.models.teacher import copy_weights, describe
from sharpkd.pipeline import StagePaths, run_stage
from sharpkd.teachers import obtain_teacher


def run(params: Params, paths: StagePaths, tracker) -> dict:
    scale, source = params.data.scale, params.teacher.source
    model, weights_file, fields = obtain_teacher(params, paths.pairs, tracker)
    with atomic_dir(paths.teacher) as tmp:
        dest = tmp / "teacher.pth"
        if weights_file is not None:  # kept byte for byte: its sha256 stays the published one
            copy_weights(weights_file, dest)
        else:
            torch.save(model.state_dict(), dest)
        info = describe(
            model,
            source=source,
            scale=scale,
            weights=dest,
            feature_layers=params.teacher.feature_layers,
            **fields,
        )
        write_json(tmp / "teacher.json", info)
    print(
        f"[teacher] {info['architecture']} x{scale} from {source}: "
        f"{info['params']:,} params -> {paths.teacher}"
    )
    tracker.log_metrics({"teacher.params": info["params"]})
    tracker.set_tags({"teacher.architecture": info["architecture"]})
    return info


if __name__ == "__main__":
    run_stage("teacher", run)
