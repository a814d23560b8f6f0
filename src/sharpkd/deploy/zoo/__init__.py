"""The student zoo: trained students shipped inside the package, verified by sha256 when loaded.

Each student is a folder beside this file (`balanced/`, `fast/`) holding its INT8 ONNX (what sharpen
runs by default), its float32 ONNX, its folded weights (`student.pth`, what `student.init` fine-tunes
from) and `card.json`: the sha256 of each file, what made it (data, teacher, recipe, steps) and its
figures (PSNR in float32 and INT8, ms per 1080p frame on a named CPU). `scripts/zoo_publish.py` writes a
folder from a finished experiment (`profiles/zoo.yaml`); docs/zoo.md says how to reproduce them.

`zoo:NAME` names a student wherever a model is taken (`sharpkd sharpen --model zoo:fast`,
`student.init: zoo:balanced`). Imports nothing but the standard library: the light install has it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sharpkd.errors import UserError

ZOO_DIR = Path(__file__).resolve().parent
PREFIX = "zoo:"
DEFAULT = "balanced"
# What each kind of use reads from a student's folder.
FILES = {"int8": "student_int8.onnx", "fp32": "student.onnx", "pth": "student.pth"}
CARD = "card.json"


@dataclass(frozen=True)
class ZooFile:
    """A zoo file whose bytes matched the sha256 its card records."""

    spec: str  # zoo:NAME
    path: Path
    sha256: str


def is_zoo(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def names() -> list[str]:
    """The students shipped, in the order of their cards' `order` (balanced first)."""
    found = [p.parent.name for p in ZOO_DIR.glob(f"*/{CARD}")]
    return sorted(found, key=lambda n: (card(n).get("order", 99), n))


def card(name: str) -> dict:
    path = ZOO_DIR / name / CARD
    if not path.is_file():
        known = ", ".join(PREFIX + n for n in names()) or "none: this install ships no zoo"
        raise UserError(f"{PREFIX}{name}: no such student in the zoo (known: {known})")
    return _read_card(path)


@cache
def _read_card(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: the zoo's card cannot be read ({exc}); reinstall sharpkd") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise UserError(f"{path}: the zoo's card lists no files; reinstall sharpkd")
    return data


def name_of(spec: str) -> str:
    """`zoo:NAME` -> NAME (an unknown name is an error listing the known ones)."""
    if not is_zoo(spec):
        raise UserError(f"{spec!r} is not a zoo name (zoo:NAME)")
    name = spec[len(PREFIX) :]
    card(name)
    return name


def sha256(path: Path) -> str:
    """The sha256 of a file, read in blocks (the deploy wing's one digest: zoo files, loaded models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def zoo_file(spec: str, kind: str = "int8") -> ZooFile:
    """The file of `kind` (int8, fp32, pth) of the student `spec` names, after checking its sha256
    against the card: a changed or damaged file is refused with one line."""
    name = name_of(spec)
    filename = FILES[kind]
    path = ZOO_DIR / name / filename
    expected = card(name)["files"].get(filename, {}).get("sha256")
    if not path.is_file() or not expected:
        raise UserError(f"{PREFIX}{name}: {filename} is missing from the zoo ({path}); reinstall sharpkd")
    actual = sha256(path)
    if actual != expected:
        raise UserError(
            f"{path}: sha256 {actual[:12]}... does not match the zoo card's {expected[:12]}...: the file was "
            "changed or damaged; refusing to load it (reinstall sharpkd)"
        )
    return ZooFile(f"{PREFIX}{name}", path, actual)


def describe(name: str) -> str:
    """One line: what the student is and how good and fast it is, from its card."""
    c = card(name)
    set5 = c.get("quality", {}).get("Set5", {})
    speed = c.get("speed", {})
    parts = [f"{PREFIX}{name}: {c.get('title', name)}"]
    if set5.get("psnr_int8") is not None:
        parts.append(f"{set5['psnr_int8']:.2f} dB on Set5 x4 (INT8)")
    if speed.get("int8_ms") is not None:
        parts.append(f"{speed['int8_ms']:.0f} ms per 1080p frame ({speed.get('cpu', 'CPU not recorded')})")
    return ", ".join(parts)
