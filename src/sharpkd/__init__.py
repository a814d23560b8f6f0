"""sharpkd: image sharpening by knowledge distillation."""

__version__ = "0.1.0"
