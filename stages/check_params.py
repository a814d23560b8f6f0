"""DVC stage `check_params`: validate the whole of params.yaml, first, with no outputs.

Its one non-code dependency is params.yaml itself (not a list of keys), so any edit of the file
runs it, also one that no other stage depends on: a typo such as `data.patch_sise: 64` or a
top-level `distil:` then fails `dvc repro` with a line naming the key instead of "Data and
pipelines are up to date". `run_stage` does the validating (config.load_params, as for every
stage); it records no MLflow run, as it computes nothing. It also checks that the files the params
need from elsewhere (student.init, pretrained weights) can be had: a stage that cannot get one would
fail only after DVC had deleted its outputs.
"""

from __future__ import annotations

from sharpkd.config import Params, flatten
from sharpkd.fetch import check_pretrained
from sharpkd.finetune import check_init
from sharpkd.pipeline import StagePaths, run_stage


def run(params: Params, paths: StagePaths, tracker) -> dict:
    keys = flatten(params)
    check_init(params)  # a student.init of another size stops here, before any output is replaced
    files = check_pretrained(params)  # so does a pretrained file that is missing and cannot be downloaded
    print(
        f"[check_params] params.yaml: all {len(keys)} keys valid"
        + (f"; found or downloadable: {', '.join(files)}" if files else "")
    )
    return {"keys": len(keys), "pretrained": files}


if __name__ == "__main__":
    run_stage("check_params", run, track=False)
