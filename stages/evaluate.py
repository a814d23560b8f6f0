"""DVC stage `evaluate`: bicubic vs teacher vs student, quality and speed -> metrics/eval.json, per_image.csv, compare/."""

from sharpkd.evaluate import evaluate
from sharpkd.stage import run_stage


def main(params, tracker):
    evaluate(params, tracker)


if __name__ == "__main__":
    run_stage("evaluate", main)
