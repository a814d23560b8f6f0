"""DVC stage `distill`: train the student -> models/student/, metrics/train.json, metrics/train_curve.tsv.

Runs unchanged under `torchrun --nproc_per_node=N stages/distill.py` (DDP; rank 0 writes).
"""

from sharpkd.distill import distill
from sharpkd.stage import run_stage


def main(params, tracker):
    distill(params, tracker)


if __name__ == "__main__":
    run_stage("distill", main)
