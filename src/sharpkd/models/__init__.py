"""Architectures (student, PAN, EDSR) and the teacher-loading table (teacher.py)."""

from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
