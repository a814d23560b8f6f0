"""DVC stage `export`: models/student/student.pth -> models/export/ (ONNX fp32/fp16, TorchScript, model card), metrics/export.json."""

from sharpkd.export import export_student
from sharpkd.stage import run_stage


def main(params, tracker):
    export_student(params, tracker)


if __name__ == "__main__":
    run_stage("export", main)
