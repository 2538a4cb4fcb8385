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


# LLaVA-NeXT's pinpoints (llava-v1.6-vicuna-7b config.json image_grid_pinpoints; symmetric, so either reading).
NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("frame_wh", [(640, 480), (1280, 720)])   # 4:3 and 16:9 frames
def test_igvlm_collage_gets_llava_next_base_plus_2x2_crops(frame_wh):
  from m3_jax import geometry
  w, h = frame_wh
  frames = [Image.new("RGB", (w, h))] * 6
  img = video.collage(frames)                          # 3 rows x 2 columns: 4:3 -> 8:9, 16:9 -> 32:27
  assert img.size == (2 * w, 3 * h)
  assert geometry.grid_shape((img.height, img.width), NEXT_PINS, "hw", 336) == (2, 2)
  # base + 2x2 crops: Table 3's 2880 / 720 / 180 / 45 / 5 tokens are 5 crops x 576 / 144 / 36 / 9 / 1.
  # m3-jax's earlier 2 rows x 3 columns (4:3 -> 2:1, 16:9 -> 8:3) gets 1x2 and 1x3 grids instead.
  old = video.collage(frames, cols=3)
  assert geometry.grid_shape((old.height, old.width), NEXT_PINS, "hw", 336) == {(640, 480): (1, 2),
                                                                                (1280, 720): (1, 3)}[frame_wh]


def test_igvlm_collage_visual_tokens_on_a_tiny_llava_next(fixtures_dir, tmp_path):
  """The fixture NeXT model (crop 48, pinpoints (h, w) 48x96, 96x48, 96x96): collages of 4:3 and 16:9 frames get
  base + 2x2 crops; at 36 tokens per crop the 12 x 12 token map is unpadded, a newline closes each kept row."""
  from m3_jax.convert.convert import convert
  from m3_jax.eval.loader import load
  convert(fixtures_dir / "transformers-5.23.0" / "llava-next", tmp_path / "next", progress=False)
  model = load(tmp_path / "next")
  c43 = video.collage([Image.new("RGB", (32, 24), (9, 99, 199))] * 6)   # (h, w) = (72, 64)
  c169 = video.collage([Image.new("RGB", (32, 18), (9, 99, 199))] * 6)  # (h, w) = (54, 64)
  got = model.visual([c43, c169], [36, 36])   # the visual tokens the prompt gets, without the decoder
  # 4:3: width 64 * 12 / 72 = 10.67 -> 10 columns kept (1 padding each side) -> 36 + 12 * (10 + 1) = 168.
  # 16:9: height 54 * 12 / 64 = 10.125 -> 10 rows kept -> 36 + 10 * (12 + 1) = 166.
  assert [v.shape[0] for v in got] == [168, 166]
