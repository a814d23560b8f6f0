"""DVC stage `download`: HR images from data.source -> data/raw/{train,valid}/ + manifest.csv."""

from sharpkd.data.sources import build_raw_dataset
from sharpkd.stage import run_stage


def main(params, tracker):
    build_raw_dataset(params, out_dir="data/raw", tracker=tracker)


if __name__ == "__main__":
    run_stage("download", main)
