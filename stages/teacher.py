"""DVC stage `teacher`: obtain the teacher (teacher.source) -> models/teacher/."""

from sharpkd.build_teacher import build_teacher
from sharpkd.stage import run_stage


def main(params, tracker):
    build_teacher(params, tracker)


if __name__ == "__main__":
    run_stage("teacher", main)
