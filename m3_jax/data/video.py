"""Video as one image: a few frames tiled into a grid, as IG-VLM builds it for the M3 paper's video benchmarks.

  img = load_video("clip.mp4")                        # IG-VLM: 6 frames at k * floor(n / 6), 3 rows x 2 columns
  img = load_video("clip.mp4", "linspace_2x3")        # 6 frames at round(linspace(0, n - 1)), 2 rows x 3 columns
  frames = sample_frames("clip.mp4", 6, "igvlm")      # the frames alone (RGB PIL images); a frame folder works too
  img = collage(frames, cols=2)                       # the grid alone

The official M3 repository evaluates video with its copy of IG-VLM (github.com/imagegridworth/IG-VLM, vendored as
mu-cai/matryoshka-mm/IG-VLM): `vision_processor/fps_extractor.py` keeps frames 0, s, 2s, ... 5s with
s = floor(n / 6), n the container's frame count; `vision_processor/gridview_generator.py` resizes every frame to
the smallest width and height among them, pads with white frames to a multiple of `max_images_per_row =
round(sqrt(6)) = 2` (`fps_gridview_processor.py`) and stacks rows of that many frames top to bottom.
"""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np
from PIL import Image

from m3_jax.data import image as image_lib

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def igvlm_indices(num_frames: int, k: int) -> list[int]:
  """IG-VLM's `FpsExtractor`: `i * floor(num_frames / k)` for i < k (the last frame is usually not among them)."""
  _check_counts(num_frames, k)
  step = num_frames // k
  if step == 0:  # IG-VLM divides by this step and drops the video
    raise ValueError(f"the video has {num_frames} frames: IG-VLM's sampling k * floor(n / {k}) needs at least {k}")
  return [i * step for i in range(k)]


def linspace_indices(num_frames: int, k: int) -> list[int]:
  """`k` indices `round(linspace(0, num_frames - 1, k))`: first and last frames in; repeats when k > num_frames."""
  _check_counts(num_frames, k)
  return [int(round(x)) for x in np.linspace(0, num_frames - 1, k)]


def _check_counts(num_frames: int, k: int):
  if num_frames <= 0:
    raise ValueError("the video has no frames")
  if k <= 0:
    raise ValueError(f"number of frames to sample must be positive, got {k}")


SAMPLERS = {"igvlm": igvlm_indices, "linspace": linspace_indices}
# name -> (frames, sampler, columns). "igvlm" is the paper's (IG-VLM's); "linspace_2x3" is m3-jax's earlier layout.
COLLAGES = {"igvlm": (6, "igvlm", round(math.sqrt(6))), "linspace_2x3": (6, "linspace", 3)}


def _frame_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
  if not files:
    raise ValueError(f"frame folder {folder} holds no images ({', '.join(FRAME_SUFFIXES)})")
  return files


def sample_frames(src: str | os.PathLike, k: int = 6, sampling: str = "igvlm") -> list[Image.Image]:
  """`k` RGB frames of a video file (PyAV) or a folder of frame images (sorted by name), at the indices of
  `SAMPLERS[sampling]`."""
  if sampling not in SAMPLERS:
    raise ValueError(f"frame sampling {sampling!r}: expected one of {', '.join(SAMPLERS)}")
  indices = SAMPLERS[sampling]
  path = pathlib.Path(src)
  if path.is_dir():
    files = _frame_files(path)
    return [image_lib.load_image(files[i]) for i in indices(len(files), k)]
  if not path.exists():
    raise FileNotFoundError(f"video {path} does not exist")
  import av
  try:
    with av.open(str(path)) as container:
      stream = container.streams.video[0]
      wanted = indices(stream.frames or _count(container, stream), k)
      keep = _decode(container, stream, set(wanted))
      if len(keep) < len(set(wanted)):
        # The container over-reported its frame count: count by decoding, then sample again.
        wanted = indices(_count(container, stream), k)
        keep = _decode(container, stream, set(wanted))
  except av.error.FFmpegError as e:
    raise ValueError(f"video {path} cannot be decoded ({e})") from None
  except ValueError as e:
    raise ValueError(f"video {path}: {e}") from None
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


def collage(frames: list[Image.Image], cols: int | None = None) -> Image.Image:
  """IG-VLM's `GridViewCreator`: frames in reading order, `cols` per row (default round(sqrt(len(frames)))), each
  resized to the smallest width and the smallest height among them, the last row padded with white frames."""
  if not frames:
    raise ValueError("a collage needs at least one frame")
  cols = cols or round(math.sqrt(len(frames)))
  w, h = min(f.width for f in frames), min(f.height for f in frames)
  rows = -(-len(frames) // cols)
  out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
  for i, f in enumerate(frames):
    # IG-VLM resizes with cv2's bilinear; frames of one video share their size, so this rarely runs.
    f = f if f.size == (w, h) else f.resize((w, h), Image.Resampling.BILINEAR)
    out.paste(f.convert("RGB"), ((i % cols) * w, (i // cols) * h))
  return out


def load_video(src: str | os.PathLike, layout: str = "igvlm") -> Image.Image:
  """Video file or frame folder -> one collage image laid out as `COLLAGES[layout]` (then preprocess it like any
  image)."""
  if layout not in COLLAGES:
    raise ValueError(f"video collage layout {layout!r}: expected one of {', '.join(COLLAGES)}")
  k, sampling, cols = COLLAGES[layout]
  return collage(sample_frames(src, k, sampling), cols)
