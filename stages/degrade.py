"""DVC stage `degrade`: training patches and validation images with their degraded versions -> data/pairs/."""

from sharpkd.data.degrade import build_pairs
from sharpkd.stage import run_stage


def main(params, tracker):
    build_pairs(params, raw_dir="data/raw", out_dir="data/pairs", tracker=tracker)


if __name__ == "__main__":
    run_stage("degrade", main)
