"""The sharpener as a Python library: for a notebook or an application.

    from sharpkd.deploy import load_model, sharpen_array, sharpen_file

    model = load_model("student_int8.onnx")   # once; or pass the path to each call
    sharp = sharpen_array(photo, model)       # HxWx3 / HxW uint8 or uint16 array, or a PIL image
    sharpen_file("clip.mp4", "clip_sharp.mp4", model)

What `sharpkd sharpen` does to one file, without the command line: greyscale stays greyscale (the luma of
the colour model's output), alpha is kept as it is, 16-bit stays 16-bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from sharpkd.deploy.encoding import VideoOptions, check_container
from sharpkd.deploy.jobs import Job, default_output, is_video
from sharpkd.deploy.models import Model, load_model
from sharpkd.deploy.sharpen import sharpen_image, sharpen_pixels, sharpen_video
from sharpkd.deploy.tiling import check_tiling
from sharpkd.errors import UserError

ModelSpec = Model | str | Path | None
# PIL modes taken as they are; any other mode is converted to RGB first.
_PIL_MODES = {"L", "RGB", "RGBA", "LA", "I;16"}


def _model(model: ModelSpec, device: str) -> Model:
    return model if isinstance(model, Model) else load_model(model, device)


def sharpen_array(
    image: np.ndarray | Image.Image,
    model: ModelSpec = None,
    *,
    device: str = "cpu",
    tile: int | None = None,
    overlap: int | None = None,
) -> np.ndarray | Image.Image:
    """Sharpen one image in memory and return it in the same form.

    `image`: a NumPy array, HxWx3 RGB or HxW greyscale (HxWx4 RGBA: the alpha is kept as it is), uint8 or
    uint16; or a PIL image (modes L, LA, RGB, RGBA, I;16 kept; any other converted to RGB).
    `model`: a loaded Model (`load_model`), a path to a .onnx (.pt/.pth with the training stack) or a
    registered student `models:/<name>/<version>`; None: this checkout's exported student.
    `tile` / `overlap`: the tiling (default 256 / 16 pixels): memory stays bounded at any size.
    """
    net = _model(model, device)
    tile, overlap = check_tiling(tile, overlap)
    if isinstance(image, Image.Image):
        im = image if image.mode in _PIL_MODES else image.convert("RGB")
        out = sharpen_array(np.asarray(im), net, tile=tile, overlap=overlap)
        return Image.fromarray(out)  # the mode follows from the shape and type: L, LA, RGB, RGBA, I;16
    arr = np.asarray(image)
    if arr.dtype not in (np.uint8, np.uint16):
        raise UserError(f"sharpen_array takes uint8 or uint16 pixels, got {arr.dtype}")
    alpha = None
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # grey + alpha, RGB + alpha
        arr, alpha = arr[..., :-1], arr[..., -1:]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.ndim == 3 and arr.shape[2] != 3:
        raise UserError(f"sharpen_array takes HxW, HxWx3 or HxWx4 pixels, got shape {arr.shape}")
    out = sharpen_pixels(net, arr, tile, overlap)
    if alpha is None:
        return out
    return np.concatenate([out[..., None] if out.ndim == 2 else out, alpha], axis=2)


def sharpen_file(
    src: str | Path,
    dst: str | Path | None = None,
    model: ModelSpec = None,
    *,
    device: str = "cpu",
    tile: int | None = None,
    overlap: int | None = None,
    overwrite: bool = False,
    video: VideoOptions | None = None,
) -> Path:
    """Sharpen an image or video file into `dst` (default: <name>_sharp.<ext> beside it) and return `dst`.

    Images as `sharpen_array` does them (any format Pillow reads; alpha, 16 bits and EXIF orientation
    kept); videos as `sharpkd sharpen` does them (whole frames, audio and subtitles copied; `video`: the
    encoder's options). `overwrite=False`: an existing `dst` is an error. Frames of a damaged video that
    cannot be decoded raise sharpen.FramesLost after the others are written.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(default_output(src))
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    # lexists: a dangling symlink is taken too (the final rename would refuse it after the work).
    if os.path.lexists(dst) and not overwrite:
        raise UserError(f"{dst} exists; pass overwrite=True to replace it")
    if is_video(src):
        check_container(video or VideoOptions(), dst.suffix)  # before the model is loaded
    net = _model(model, device)
    tile, overlap = check_tiling(tile, overlap)
    job = Job(src, dst, None, overwrite)
    if is_video(src):
        sharpen_video(net, job, None, overlap, opts=video)
    else:
        sharpen_image(net, job, tile, overlap)
    return dst
