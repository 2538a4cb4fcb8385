"""Video frames -> collage (IG-VLM's indices and grid, and the linspace 2x3 option), from a tiny video written here
with PyAV and from a frame folder."""
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


def test_igvlm_indices():
  # i * floor(n / 6): n = 12 -> step 2; 17 -> 2 (frames 12..16 never shown); 369 (a NExT-QA clip) -> 61.
  assert video.igvlm_indices(12, 6) == [0, 2, 4, 6, 8, 10]
  assert video.igvlm_indices(17, 6) == [0, 2, 4, 6, 8, 10]
  assert video.igvlm_indices(6, 6) == [0, 1, 2, 3, 4, 5]
  assert video.igvlm_indices(369, 6) == [0, 61, 122, 183, 244, 305]
  with pytest.raises(ValueError, match="has 5 frames: IG-VLM's sampling k \\* floor\\(n / 6\\) needs at least 6"):
    video.igvlm_indices(5, 6)
  with pytest.raises(ValueError, match="no frames"):
    video.igvlm_indices(0, 6)


def test_linspace_indices():
  assert video.linspace_indices(12, 6) == [0, 2, 4, 7, 9, 11]   # round(linspace(0, 11, 6)) = 0, 2.2, 4.4, 6.6, 8.8, 11
  assert video.linspace_indices(3, 6) == [0, 0, 1, 1, 2, 2]


def test_video_file_igvlm_collage(tmp_path):
  levels = [20 * i for i in range(12)]   # frame i is grey 20 * i
  path = tmp_path / "clip.mp4"
  _write_video(path, levels)
  frames = video.sample_frames(path, 6)
  means = [float(np.asarray(f).mean()) for f in frames]
  np.testing.assert_allclose(means, [20 * i for i in (0, 2, 4, 6, 8, 10)], atol=4)
  img = video.load_video(path)
  assert img.size == (64, 96) and img.mode == "RGB"   # 3 rows x 2 columns of 32 x 32
  a = np.asarray(img).astype(float)
  tiles = [a[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].mean() for r in range(3) for c in range(2)]
  np.testing.assert_allclose(tiles, means, atol=0.5)   # reading order: row 0 = frames 0, 2; row 1 = 4, 6; ...
  old = video.load_video(path, "linspace_2x3")
  assert old.size == (96, 64)
  b = np.asarray(old).astype(float)
  np.testing.assert_allclose([b[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].mean() for r in range(2) for c in range(3)],
                             [20 * i for i in (0, 2, 4, 7, 9, 11)], atol=4)


def test_collage_resizes_to_the_smallest_side_and_pads_white():
  frames = [Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(5)] + [Image.new("RGB", (12, 6), (0, 0, 9))]
  img = video.collage(frames)                  # round(sqrt(6)) = 2 per row; tiles are min(w) x min(h) = 10 x 6
  assert img.size == (20, 18)
  a = np.asarray(img)
  assert [tuple(a[r * 6 + 3, c * 10 + 5]) for r in range(3) for c in range(2)] == [
      (0, 0, 0), (40, 0, 0), (80, 0, 0), (120, 0, 0), (160, 0, 0), (0, 0, 9)]
  five = video.collage(frames[:5], cols=2)     # 5 frames -> 3 rows, the last tile white
  assert five.size == (20, 24) and tuple(np.asarray(five)[20, 15]) == (255, 255, 255)


def test_frame_folder_and_errors(tmp_path):
  for i in range(7):
    Image.new("RGB", (10, 8), (i * 30, 0, 0)).save(tmp_path / f"f{i:03d}.png")
  img = video.load_video(tmp_path)             # 7 frames: step 1 -> frames 0..5
  a = np.asarray(img)
  assert img.size == (20, 24)
  assert [a[r * 8, c * 10, 0] for r in range(3) for c in range(2)] == [0, 30, 60, 90, 120, 150]
  with pytest.raises(ValueError, match="layout 'grid': expected one of igvlm, linspace_2x3"):
    video.load_video(tmp_path, "grid")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    video.sample_frames(tmp_path / "nope.mp4")
  (tmp_path / "bad.mp4").write_bytes(b"not a video")
  with pytest.raises(ValueError, match="cannot be decoded"):
    video.sample_frames(tmp_path / "bad.mp4")
  short = tmp_path / "short.mp4"
  _write_video(short, [0, 50, 100])
  with pytest.raises(ValueError, match="short.mp4: the video has 3 frames"):
    video.load_video(short)
