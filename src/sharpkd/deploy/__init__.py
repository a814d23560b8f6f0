"""The deploy wing: what running a student needs, and nothing of the training pipeline or torch.

ONNX Runtime, NumPy, Pillow and PyAV (plus typer and rich for the command line) are all it imports; a .pt
or .pth model imports torch when it is opened (`pip install 'sharpkd[pipeline]'`), a registered model
`models:/...` imports MLflow (`pip install 'sharpkd[serve]'`). The pipeline calls into this package (its
loading, tiling and timing); this package never imports the pipeline's modules at import time.

    models.py        what --model means (resolve_model) and the model it opens (load_model)
    descriptor.py    the typed model descriptor, Model
    checkout.py      where a checkout keeps its exported students
    torch_models.py  .pt / .pth models (torch, imported only for them)
    sessions.py      the one ONNX Runtime session builder; a session as an array function
    pixels.py        the one uint8/uint16 <-> float conversion
    tiling.py        the one tiled inference path
    images.py        image files in and out
    jobs.py          inputs and outputs of `sharpkd sharpen`
    sharpen.py       `sharpkd sharpen`: images, and videos through transcode.py
    encoding.py      video: the encoder, its options and pixel format
    frames.py        video: frames as planes, the model's input and output
    threads.py       video: the reader / model / writer threads
    transcode.py     video: one file in, one sharpened file out
    api.py           sharpen_array, sharpen_file: the Python API
    serving.py       the MLflow pyfunc flavor (`mlflow models serve`)
    timing.py        the one timing path
    bench.py         `sharpkd bench`; bench_video.py: `sharpkd bench --video`
"""

import importlib

# The public API, imported on first use: `import sharpkd.deploy.<module>` (the pipeline's config reading
# the zoo, say) then loads only that module, not ONNX Runtime and PyAV.
_PUBLIC = {
    "sharpen_array": "sharpkd.deploy.api",
    "sharpen_file": "sharpkd.deploy.api",
    "VideoOptions": "sharpkd.deploy.encoding",
    "Model": "sharpkd.deploy.descriptor",
    "load_model": "sharpkd.deploy.models",
    "resolve_model": "sharpkd.deploy.models",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sharpkd.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
