"""Video as one image: frames sampled uniformly and tiled into a collage (IG-VLM style, as the M3 paper evaluates).

  frames = sample_frames("clip.mp4", 6)          # 6 RGB PIL images, uniformly over the video
  img = collage(frames, rows=2, cols=3)          # one RGB image, frames in reading order
  img = load_video("clip.mp4")                   # both steps; also accepts a folder of frame images

Uniform sampling follows IG-VLM: indices `linspace(0, n - 1, k)` rounded, so the first and last frames are in.
Each collage tile is the frame resized to the size of the first frame (frames of one video share it anyway).
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

from m3_jax.data import image as image_lib

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def uniform_indices(num_frames: int, k: int) -> list[int]:
  """`k` indices spread uniformly over `num_frames` (first and last included; repeats when k > num_frames)."""
  if num_frames <= 0:
    raise ValueError("the video has no frames")
  if k <= 0:
    raise ValueError(f"number of frames to sample must be positive, got {k}")
  return [int(round(x)) for x in np.linspace(0, num_frames - 1, k)]


def _frame_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
  if not files:
    raise ValueError(f"frame folder {folder} holds no images ({', '.join(FRAME_SUFFIXES)})")
  return files


def sample_frames(src: str | os.PathLike, k: int = 6) -> list[Image.Image]:
  """`k` RGB frames sampled uniformly from a video file (PyAV) or a folder of frame images (sorted by name)."""
  path = pathlib.Path(src)
  if path.is_dir():
    files = _frame_files(path)
    return [image_lib.load_image(files[i]) for i in uniform_indices(len(files), k)]
  if not path.exists():
    raise FileNotFoundError(f"video {path} does not exist")
  import av
  try:
    with av.open(str(path)) as container:
      stream = container.streams.video[0]
      wanted = uniform_indices(stream.frames or _count(container, stream), k)
      keep = _decode(container, stream, set(wanted))
      if len(keep) < len(set(wanted)):
        # The container over-reported its frame count: count by decoding, then sample again.
        wanted = uniform_indices(_count(container, stream), k)
        keep = _decode(container, stream, set(wanted))
  except av.error.FFmpegError as e:
    raise ValueError(f"video {path} cannot be decoded ({e})") from None
  return [keep[i] for i in wanted]


def _count(container, stream) -> int:
  container.seek(0)
  n = sum(1 for _ in container.decode(stream))
  container.seek(0)
  return n


def _decode(container, stream, wanted: set[int]) -> dict[int, Image.Image]:
  """Decodes from the start up to the last wanted index (seeking is keyframe-granular, so exact indices need a
  linear decode), keeping only the wanted frames."""
  container.seek(0)
  keep, last = {}, max(wanted)
  for i, frame in enumerate(container.decode(stream)):
    if i in wanted:
      keep[i] = frame.to_image().convert("RGB")
    if i >= last:
      break
  return keep


def collage(frames: list[Image.Image], rows: int = 2, cols: int = 3) -> Image.Image:
  """Tiles `rows * cols` frames in reading order into one image (each tile the size of the first frame)."""
  if len(frames) != rows * cols:
    raise ValueError(f"a {rows}x{cols} collage needs {rows * cols} frames, got {len(frames)}")
  w, h = frames[0].size
  out = Image.new("RGB", (cols * w, rows * h))
  for i, f in enumerate(frames):
    f = f if f.size == (w, h) else f.resize((w, h), Image.Resampling.BICUBIC)
    out.paste(f.convert("RGB"), ((i % cols) * w, (i // cols) * h))
  return out


def load_video(src: str | os.PathLike, *, num_frames: int = 6, rows: int = 2, cols: int = 3) -> Image.Image:
  """Video file or frame folder -> one collage image (then preprocess it like any image)."""
  if rows * cols != num_frames:
    raise ValueError(f"num_frames {num_frames} does not fill a {rows}x{cols} collage")
  return collage(sample_frames(src, num_frames), rows, cols)
