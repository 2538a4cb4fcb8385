"""An `image_url` of a request -> an RGB image, safely: `data:` URIs (base64), or a local path only under
--allowed-image-dir (resolved, so neither `..` nor a symlink escapes it). The server never fetches a URL."""
from __future__ import annotations

import base64
import binascii
import io
import os
import pathlib
import re
import warnings

from PIL import Image

from m3_jax.data import image as image_lib
from m3_jax.serve.protocol import ApiError

DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)
PARAM = "messages.content.image_url"


def bad(message: str, code: str) -> ApiError:
  return ApiError(400, message, param=PARAM, code=code)


def resolve(url: str, allowed_dir: pathlib.Path | None, max_pixels: int) -> Image.Image:
  """Decodes the image (its size is checked from the header before decoding) or raises a 400 ApiError."""
  return load(*source(url, allowed_dir), max_pixels)


def source(url: str, allowed_dir: pathlib.Path | None) -> tuple[bytes | pathlib.Path, str]:
  """What `url` points at, before any pixel is decoded -> (the data: URI's bytes or an allowed local file, a label
  for errors); or raises a 400 ApiError."""
  scheme = url.split(":", 1)[0].lower() if ":" in url else ""
  if scheme in ("http", "https"):
    raise bad(f"image_url {url[:100]!r}: the server does not fetch URLs; send the image as a data: URI "
              "(data:image/png;base64,...) or, when the server runs with --allowed-image-dir, a path under it",
              "url_not_allowed")
  if scheme == "data":
    m = DATA_URI.fullmatch(url)
    if m is None:
      raise bad("image_url data: URI: expected data:<mime>;base64,<data>", "invalid_data_uri")
    try:
      raw = base64.b64decode(m["data"], validate=True)
    except (binascii.Error, ValueError) as e:
      raise bad(f"image_url data: URI: the base64 payload does not decode ({e})", "invalid_data_uri") from None
    return raw, f"<data: URI, {len(raw)} bytes>"
  if scheme == "file":
    url = url[len("file://"):] if url.startswith("file://") else url[len("file:"):]
  elif scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
    raise bad(f"image_url scheme {scheme!r} is not served; use a data: URI or a local path", "url_not_allowed")
  return local_path(url, allowed_dir), url


def header(raw: bytes) -> Image.Image | None:
  """The image with only its header read (no pixel decoded; `load` takes it on), or None when PIL cannot read one."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      return Image.open(io.BytesIO(raw))
  except Exception:  # (the decode, wherever it runs, names the problem)
    return None


def local_path(path: str, allowed_dir: pathlib.Path | None) -> pathlib.Path:
  if allowed_dir is None:
    raise bad(f"image_url {path!r}: local paths are off on this server (start it with --allowed-image-dir DIR); "
              "send the image as a data: URI", "path_not_allowed")
  root = pathlib.Path(os.path.realpath(allowed_dir))
  try:
    # realpath follows every symlink and folds `..`, so the check below sees where the file really is.
    real = pathlib.Path(os.path.realpath(root / path))
    inside, exists = real.is_relative_to(root), real.is_file()
  except (OSError, ValueError) as e:  # a NUL byte, a name over the file system's limit, ...
    raise bad(f"image_url {path[:200]!r}: not a usable path ({type(e).__name__}: {e})", "path_not_allowed") from None
  if not inside:
    raise bad(f"image_url {path!r} resolves outside the allowed image directory {str(root)!r}", "path_not_allowed")
  if not exists:
    raise bad(f"image_url {path!r}: no such file under {str(root)!r}", "image_not_found")
  return real


def load(src: bytes | pathlib.Path | Image.Image, label: str, max_pixels: int) -> Image.Image:
  try:
    return image_lib.load_image(src, max_pixels=max_pixels, name=label)
  except image_lib.ImageError as e:
    code = "image_too_large" if "exceeds the limit" in str(e) or "decompression bomb" in str(e) else "invalid_image"
    raise bad(str(e), code) from None
