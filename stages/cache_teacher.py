"""DVC stage `cache_teacher`: teacher outputs and features for every input -> data/teacher/."""

from sharpkd.stage import run_stage
from sharpkd.teacher_cache import cache_teacher


def main(params, tracker):
    cache_teacher(params, tracker)


if __name__ == "__main__":
    run_stage("cache_teacher", main)
