"""One video through three threads, bounded queues between them (`depth`: QUEUE_DEPTH items, fewer for
large frames):

  reader   demux, decode (with FFmpeg's own threads on a GPU), each frame to planar RGB (swscale), and to
           the model's input (frames.ModelIO.prepare)
  main     the model, on batches of frames: only the model, so it runs back to back
  writer   the model's planar RGB output -> the encoder's pixel format (swscale), encode, mux; the copied
           packets muxed

Copied packets travel through the same queues, in file order. The first thread that fails stops the
others, and its error is raised. `StageClock` records where the time goes (`sharpkd bench --video`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sharpkd.deploy.frames import Frame, ModelIO

QUEUE_DEPTH = 8
QUEUE_BYTES = 256 * 2**20  # at most about this much float frame data waiting in each queue
_END = object()  # the last item of a queue


class Sink(Protocol):
    """An output file: sharpened frames written, other streams' packets copied (transcode's _Output)."""

    def write(self, rgb: np.ndarray, pts: int | None) -> None: ...

    def copy(self, packet) -> None: ...

    def finish(self) -> None: ...


def depth(width: int, height: int) -> int:
    """Items per queue: QUEUE_DEPTH, fewer where frames are large (QUEUE_BYTES of float frames at most)."""
    return int(np.clip(QUEUE_BYTES // (12 * width * height), 3, QUEUE_DEPTH))


class StageClock:
    """Where one video's time goes. `cpu`: CPU seconds per stage, each taken in the thread that runs it
    (time.thread_time, so a stage is charged what it took from the cores, not its waits); `model`: the
    model's wall seconds (its work is in ONNX Runtime's or torch's own threads); `process`: the whole
    process's CPU seconds."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)  # each key is written by one thread only
        self.model = 0.0
        self._process = time.process_time()
        self.process = 0.0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.thread_time()
        try:
            yield
        finally:
            self.cpu[name] += time.thread_time() - t

    def stop(self) -> None:
        self.process = time.process_time() - self._process


class _Stopped(Exception):
    """Another thread failed: this one gives up quietly (that thread's error is the one raised)."""


class _Pipe:
    """Bounded queues between threads, that stop waiting as soon as any thread failed."""

    def __init__(self):
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def put(self, q: queue.Queue, item) -> None:
        while not self.failed.is_set():
            with contextlib.suppress(queue.Full):
                q.put(item, timeout=0.1)
                return
        raise _Stopped

    def drain(self, q: queue.Queue) -> Iterator[object]:
        """The items of `q` up to its _END."""
        while True:
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                if self.failed.is_set():
                    raise _Stopped from None
                continue
            if item is _END:
                return
            yield item

    def spawn(self, fn: Callable, *args) -> None:
        def run():
            with contextlib.suppress(_Stopped):
                try:
                    fn(*args)
                except BaseException as exc:
                    self.fail(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, _Stopped):
            self.errors.append(exc)
        self.failed.set()

    def join(self) -> None:
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


# The nice value of the reader and writer threads when the model runs on the CPU. In one series on 2 cores
# (1080p, libx264 ultrafast), end to end against the model alone: 0.67 at 0, 0.69 as SCHED_BATCH, 0.80 at 5,
# 0.83 at 10, 0.76 at 19; 10 rather than 19, which starves them behind any other busy program.
BEHIND_THE_MODEL = 10


def behind_the_model(io: ModelIO) -> None:
    """The calling thread (reader, writer) and the threads it starts (the encoder's) at a lower priority
    (BEHIND_THE_MODEL) when the model runs on the CPU: the model's threads then run nearly as if alone and
    these fill the time they leave, instead of stalling them mid-layer (ONNX Runtime's threads wait for
    each other). Linux only, where a nice value is per thread."""
    if io.on_cpu and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BEHIND_THE_MODEL)


@dataclass
class Run:
    """One video through the three threads (module docstring)."""

    io: ModelIO
    batch: int
    out: Sink
    preview: Sink | None
    written: Callable[[], None]  # called after each frame is written
    clock: StageClock = field(default_factory=StageClock)

    def run(self, head: list, rest: Iterator[object], depth: int) -> None:
        pipe = _Pipe()
        q_in: queue.Queue = queue.Queue(depth)
        q_out: queue.Queue = queue.Queue(depth)
        pipe.spawn(self._read, pipe, rest, q_in)
        pipe.spawn(self._write, pipe, q_out)
        try:
            self._infer(pipe, itertools.chain(self._prepared(head), pipe.drain(q_in)), q_out)
        except BaseException as exc:  # Ctrl-C included: the other threads stop too
            pipe.fail(exc)
        pipe.join()
        self.clock.stop()

    def _prepared(self, items: Iterable[object]) -> Iterator[object]:
        for item in items:
            if isinstance(item, Frame):
                with self.clock.stage("to RGB"):
                    item.x = self.io.prepare(item.rgb)
            yield item

    def _read(self, pipe: _Pipe, items: Iterable[object], q_in: queue.Queue) -> None:
        behind_the_model(self.io)
        for item in self._prepared(items):
            pipe.put(q_in, item)
        pipe.put(q_in, _END)

    def _infer(self, pipe: _Pipe, items: Iterable[object], q_out: queue.Queue) -> None:
        batch: list[Frame] = []
        for item in items:
            if not isinstance(item, Frame):
                pipe.put(q_out, item)
                continue
            batch.append(item)
            if len(batch) == self.batch:
                self._sharpen_batch(pipe, batch, q_out)
                batch = []
        if batch:
            self._sharpen_batch(pipe, batch, q_out)
        pipe.put(q_out, _END)

    def _sharpen_batch(self, pipe: _Pipe, batch: list[Frame], q_out: queue.Queue) -> None:
        t = time.perf_counter()
        out = self.io.run([f.x for f in batch])
        self.clock.model += time.perf_counter() - t
        for f, y in zip(batch, out, strict=True):
            self.io.release(f.x)
            f.x, f.y = None, y
            pipe.put(q_out, f)

    def _write(self, pipe: _Pipe, q_out: queue.Queue) -> None:
        behind_the_model(self.io)
        for item in pipe.drain(q_out):
            if not isinstance(item, Frame):
                self.out.copy(item)
                continue
            # The model's float output goes to swscale as it is (one rounding, into YUV); the preview's
            # two halves meet in uint8.
            self.out.write(item.y, item.pts)
            if self.preview is not None:
                self.preview.write(
                    np.concatenate([np.stack(item.rgb), self.io.finish(item.y)], axis=2), item.pts
                )
            self.written()
        self.out.finish()
        if self.preview is not None:
            self.preview.finish()
