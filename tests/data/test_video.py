"""Video frames -> collage, from a tiny video written here with PyAV and from a frame folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m3_jax.data import video


def _write_video(path, levels, size=32):
  import av
  with av.open(str(path), "w") as out:
    s = out.add_stream("mpeg4", rate=10)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    s.options = {"qscale": "1"}
    for v in levels:
      frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), v, np.uint8), format="rgb24")
      for packet in s.encode(frame):
        out.mux(packet)
    for packet in s.encode():
      out.mux(packet)


def test_uniform_indices():
  assert video.uniform_indices(12, 6) == [0, 2, 4, 7, 9, 11]   # round(linspace(0, 11, 6)) = 0, 2.2, 4.4, 6.6, 8.8, 11
  assert video.uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]
  with pytest.raises(ValueError, match="no frames"):
    video.uniform_indices(0, 6)


def test_video_file_collage(tmp_path):
  levels = [20 * i for i in range(12)]   # frame i is grey 20 * i
  path = tmp_path / "clip.mp4"
  _write_video(path, levels)
  frames = video.sample_frames(path, 6)
  means = [float(np.asarray(f).mean()) for f in frames]
  np.testing.assert_allclose(means, [20 * i for i in (0, 2, 4, 7, 9, 11)], atol=4)
  img = video.load_video(path)
  assert img.size == (96, 64) and img.mode == "RGB"
  a = np.asarray(img).astype(float)
  tiles = [a[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].mean() for r in range(2) for c in range(3)]
  np.testing.assert_allclose(tiles, means, atol=0.5)   # reading order: row 0 = frames 0, 2, 4


def test_frame_folder_and_errors(tmp_path):
  for i in range(7):
    Image.new("RGB", (10, 8), (i * 30, 0, 0)).save(tmp_path / f"f{i:03d}.png")
  img = video.load_video(tmp_path, num_frames=4, rows=2, cols=2)
  a = np.asarray(img)
  assert img.size == (20, 16)
  assert [a[0, 0, 0], a[0, 10, 0], a[8, 0, 0], a[8, 10, 0]] == [0, 60, 120, 180]   # frames 0, 2, 4, 6
  with pytest.raises(ValueError, match="does not fill a 2x3 collage"):
    video.load_video(tmp_path, num_frames=5)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    video.sample_frames(tmp_path / "nope.mp4")
  (tmp_path / "bad.mp4").write_bytes(b"not a video")
  with pytest.raises(ValueError, match="cannot be decoded"):
    video.sample_frames(tmp_path / "bad.mp4")
