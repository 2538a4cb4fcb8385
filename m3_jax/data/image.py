"""Images: safe loading, LLaVA-1.5 pad-to-square, and CLIP preprocessing from an HF `preprocessor_config.json`.

The output of `preprocess` is what the vision tower eats: float32[H, W, 3] (NHWC once batched), already rescaled
and normalised. It matches transformers' `CLIPImageProcessor` with the PIL backend (the "slow" processor LLaVA
was trained with): resize the shortest edge (bicubic, PIL), center crop, x/255, (x - mean) / std.

Anyres (LLaVA-NeXT crops) lives in `anyres.py`; it reuses `load_image`, `expand_to_square` and `preprocess`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import warnings
from typing import Any

import numpy as np
from PIL import Image

from m3_jax.errors import BadFile

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as HF configs store it

# ~ 16k x 16k: far above any training image, far below what would exhaust host memory when decoded.
DEFAULT_MAX_PIXELS = 16384 * 16384


class ImageError(BadFile):
  """An image that cannot be used (unreadable, too large, odd mode). The message names the file."""


@dataclasses.dataclass
class ImageProcessorConfig:
  """The image-processor settings, in HF's `preprocessor_config.json` schema (a CLIPImageProcessor).

  `size` is {"shortest_edge": N} or {"height": H, "width": W}; `crop_size` is {"height": H, "width": W}.
  Keys we do not interpret are kept in `extra` and written back, so a round trip loses nothing.
  """
  do_resize: bool = True
  size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 336})
  resample: int = BICUBIC
  do_center_crop: bool = True
  crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 336, "width": 336})
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple = OPENAI_CLIP_MEAN
  image_std: tuple = OPENAI_CLIP_STD
  do_convert_rgb: bool = True
  image_processor_type: str = "CLIPImageProcessor"
  extra: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def for_size(cls, image_size: int) -> "ImageProcessorConfig":
    """The CLIP settings for a square model input of `image_size` pixels (e.g. 48 for the tiny config)."""
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})

  @classmethod
  def from_dict(cls, d: dict) -> "ImageProcessorConfig":
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names}
    # Old configs store sizes as ints: `size: 336` means shortest edge, `crop_size: 336` a square.
    if isinstance(known.get("size"), int):
      known["size"] = {"shortest_edge": known["size"]}
    if isinstance(known.get("crop_size"), int):
      known["crop_size"] = {"height": known["crop_size"], "width": known["crop_size"]}
    for k in ("image_mean", "image_std"):
      if k in known:
        v = known[k]
        known[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    cfg = cls(**known, extra=extra)
    cfg.validate()
    return cfg

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
    """Reads `preprocessor_config.json` (a file, or a directory holding one)."""
    p = pathlib.Path(path)
    if p.is_dir():
      p = p / "preprocessor_config.json"
    try:
      d = json.loads(p.read_text())
    except FileNotFoundError:
      raise FileNotFoundError(f"no image-processor config at {p} (expected HF's preprocessor_config.json)") from None
    return cls.from_dict(d)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
    d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
    return {**self.extra, **d}

  def to_json(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes `preprocessor_config.json` (into `path` when it is a directory) and returns the file path."""
    p = pathlib.Path(path)
    if p.is_dir():
      p = p / "preprocessor_config.json"
    p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
    return p

  def validate(self):
    if self.do_resize and not ("shortest_edge" in self.size or {"height", "width"} <= set(self.size)):
      raise ValueError(f"image-processor size {self.size} needs 'shortest_edge' or 'height' and 'width'")
    if self.do_center_crop and not {"height", "width"} <= set(self.crop_size):
      raise ValueError(f"image-processor crop_size {self.crop_size} needs 'height' and 'width'")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ValueError(f"image_mean/image_std need 3 values, got {self.image_mean} / {self.image_std}")

  @property
  def output_size(self) -> tuple[int, int]:
    """(height, width) of `preprocess` output for a large enough image."""
    if self.do_center_crop:
      return int(self.crop_size["height"]), int(self.crop_size["width"])
    if "height" in self.size:
      return int(self.size["height"]), int(self.size["width"])
    raise ValueError("output size depends on the image: no center crop and a shortest-edge resize")

  @property
  def pad_color(self) -> tuple[int, int, int]:
    """LLaVA-1.5's square-padding colour: `int(255 * mean)` per channel = (122, 116, 104) for CLIP."""
    return tuple(int(255 * m) for m in self.image_mean)


# ---------------------------------------------------------------------------------------------------- loading


def load_image(src: str | os.PathLike | bytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
  """Opens an image file (or bytes) and returns it as 8-bit RGB.

  Reads the header first and refuses images above `max_pixels` before decoding them (a decompression bomb
  would otherwise take gigabytes). Mode conversions: transparency is composited onto white (as HF's
  `convert_to_rgb`), 16-bit images are scaled (65535 -> 255) instead of clipped, CMYK uses PIL's
  (255 - K)(1 - C/255) conversion, greyscale and palette images are expanded to RGB.
  """
  label = name or (f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else str(src))
  if isinstance(src, Image.Image):
    img = src
  else:
    try:
      with warnings.catch_warnings():
        # PIL warns (and only raises at 2x its limit); we check against our own limit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    except FileNotFoundError:
      raise ImageError(f"image {label}: file not found") from None
    except Image.DecompressionBombError as e:
      raise ImageError(f"image {label}: refused as a possible decompression bomb ({e})") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
      raise ImageError(f"image {label}: cannot be read as an image ({type(e).__name__}: {e})") from None
  w, h = img.size
  if w * h > max_pixels:
    raise ImageError(f"image {label}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                     f"(a possible decompression bomb; raise max_pixels if the image is genuine)")
  if w == 0 or h == 0:
    raise ImageError(f"image {label}: empty ({w}x{h})")
  try:
    img.load()
    return to_rgb(img)
  except ImageError:
    raise
  except Exception as e:
    raise ImageError(f"image {label}: cannot be decoded ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB (see `load_image`)."""
  mode = img.mode
  if mode == "RGB":
    return img
  if mode.startswith("I;16") or mode == "I":
    # 16-bit PNG/TIFF: PIL's convert("RGB") would clip at 255 and turn most of the image white.
    a = np.asarray(img, dtype=np.float64)
    a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a, mode="L").convert("RGB")
  if mode == "F":
    a = np.asarray(img, dtype=np.float64)
    scale = 255.0 if a.size and a.max() <= 1.0 else 1.0  # float images are either [0, 1] or [0, 255]
    return Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8), mode="L").convert("RGB")
  has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
  if has_alpha:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode not in ("L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
    raise ImageError(f"image mode {mode!r} is not supported (expected RGB, RGBA, L, LA, P, 1, CMYK, I, I;16, F)")
  return img.convert("RGB")


# ---------------------------------------------------------------------------------------------- preprocessing


def expand_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
  """LLaVA-1.5 `expand2square`: pastes the image centred on a square of `color` (the image mean)."""
  w, h = img.size
  if w == h:
    return img
  side = max(w, h)
  out = Image.new(img.mode, (side, side), color)
  out.paste(img, ((side - w) // 2, (side - h) // 2))
  return out


def _resize_target(w: int, h: int, size: dict) -> tuple[int, int]:
  """(width, height) after resizing, as HF's `get_resize_output_image_size(default_to_square=False)`."""
  if "shortest_edge" in size:
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(size["shortest_edge"]), int(int(size["shortest_edge"]) * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)
  return int(size["width"]), int(size["height"])


def _center_crop(a: np.ndarray, height: int, width: int) -> np.ndarray:
  """HF `center_crop` on uint8[H, W, C]: top-left at floor offsets, zero-padded when the image is smaller."""
  h, w = a.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  if top >= 0 and left >= 0:
    return a[top:top + height, left:left + width]
  # HF pads to at least the crop size, centring the image, then crops.
  ph, pw = max(h, height), max(w, width)
  padded = np.zeros((ph, pw) + a.shape[2:], a.dtype)
  t, l = (ph - h) // 2, (pw - w) // 2
  padded[t:t + h, l:l + w] = a
  top, left = (ph - height) // 2, (pw - width) // 2
  return padded[top:top + height, left:left + width]


def preprocess(img: Image.Image, cfg: ImageProcessorConfig, *, aspect: str = "crop",
               max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
  """RGB PIL image -> float32[H, W, 3], CLIP-normalised.

  aspect: "crop" (HF / plain CLIP: resize shortest edge, center crop) or "pad" (LLaVA-1.5: first pad to a
  square of the mean colour, so nothing is cropped away). `max_pixels`, `name`: see `resize_crop`.
  """
  return normalize(resize_crop(img, cfg, aspect=aspect, max_pixels=max_pixels, name=name), cfg)


def work_pixels(w: int, h: int, cfg: ImageProcessorConfig, aspect: str) -> int:
  """Pixels of the largest image `resize_crop` makes from a w x h one: the image itself, LLaVA-1.5's square of its
  longer side ("pad"), or the image resized to the processor's size ("crop"). A thin image makes a huge one: 16384
  x 1 pads to 16384 x 16384, and 1 x 1000 resized to a shortest edge of 336 is 336 x 336000."""
  side_w, side_h = (max(w, h),) * 2 if aspect == "pad" else (w, h)
  rw, rh = _resize_target(side_w, side_h, cfg.size) if cfg.do_resize else (side_w, side_h)
  return max(w * h, side_w * side_h, rw * rh)


def resize_crop(img: Image.Image, cfg: ImageProcessorConfig, *, aspect: str = "crop",
                max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
  """The geometric half of `preprocess`: RGB PIL image -> uint8[H, W, 3] (pad or not, resize, center crop).

  An image whose preprocessing would make one of more than `max_pixels` pixels on the way (`work_pixels`: an
  extreme aspect ratio) is an ImageError naming it (`name`) before any of it is made. The pipeline's workers stop
  here: uint8 crosses the process boundary at a quarter of float32's size."""
  if aspect not in ("pad", "crop"):
    raise ValueError(f"image aspect {aspect!r} is not 'pad' or 'crop'")
  w, h = img.size
  work = work_pixels(w, h, cfg, aspect)
  if work > max_pixels:
    how = (f"LLaVA-1.5's preprocessing pads it to a {max(w, h)}x{max(w, h)} square before resizing"
           if aspect == "pad" else f"preprocessing resizes it to {'x'.join(map(str, _resize_target(w, h, cfg.size)))}")
    raise ImageError(f"image {name + ' ' if name else ''}{w}x{h}: {how} ({work} pixels), over the limit of "
                     f"{max_pixels} pixels; crop it to a less extreme aspect ratio or raise the limit")
  if aspect == "pad":
    img = expand_to_square(img, cfg.pad_color)
  if cfg.do_convert_rgb:
    img = to_rgb(img)
  if cfg.do_resize:
    target = _resize_target(*img.size, cfg.size)
    if target != img.size:
      img = img.resize(target, resample=Image.Resampling(cfg.resample))
  a = np.asarray(img)
  if cfg.do_center_crop:
    a = _center_crop(a, int(cfg.crop_size["height"]), int(cfg.crop_size["width"]))
  return np.ascontiguousarray(a)


def normalize(a: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
  """uint8[..., 3] -> float32[..., 3]: x * rescale_factor (in float64, as HF), then (x - mean) / std in float32.
  uint8 RGB is looked up, per channel, in a table of that formula's 256 values (`_table`): the same bits, 2.1-2.2x
  faster for one 336 x 336 image (a served request's, decoded on the event loop) and 1.3-1.5x for a batch of 8
  (`python -m benchmarks.data_pipeline`, benchmarks/data_pipeline.md)."""
  if a.dtype == np.uint8 and a.ndim and a.shape[-1] == 3:
    table = _table(bool(cfg.do_rescale), float(cfg.rescale_factor), bool(cfg.do_normalize),
                   tuple(map(float, cfg.image_mean)), tuple(map(float, cfg.image_std)))
    out = np.empty(a.shape, np.float32)
    for c in range(3):
      np.take(table[c], a[..., c], out=out[..., c])
    return out
  return _normalized(a, cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.image_mean, cfg.image_std)


def _normalized(a: np.ndarray, do_rescale: bool, rescale_factor: float, do_normalize: bool, mean, std) -> np.ndarray:
  x = a.astype(np.float64) * rescale_factor if do_rescale else a
  x = x.astype(np.float32)
  if do_normalize:
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(x, dtype=np.float32)


@functools.lru_cache(maxsize=16)
def _table(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: tuple, std: tuple) -> np.ndarray:
  """float32[3, 256]: `normalize`'s value of every uint8 in each channel."""
  values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
  table = np.ascontiguousarray(_normalized(values, do_rescale, rescale_factor, do_normalize, mean, std).T)
  table.flags.writeable = False
  return table


def load_and_preprocess(src: Any, cfg: ImageProcessorConfig, *, aspect: str = "pad",
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """File/bytes -> float32[H, W, 3]; the one call the pipeline and `m3 generate` make per image. `max_pixels`
  bounds the image and every image its preprocessing makes (`resize_crop`)."""
  name = None if isinstance(src, (bytes, bytearray, Image.Image)) else str(src)
  return preprocess(load_image(src, max_pixels=max_pixels), cfg, aspect=aspect, max_pixels=max_pixels, name=name)
