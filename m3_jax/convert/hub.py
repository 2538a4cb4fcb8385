"""`m3 convert`'s source argument: a directory, or a HuggingFace hub id found in the local HuggingFace cache.

Never downloads: a hub id that is not in the cache is an error that says how to fetch it.
"""
from __future__ import annotations

import os
import re

from m3_jax.convert.hf import ConversionError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def resolve(src: str, cache_dir: str | None = None) -> str:
  """`src` itself when it is an existing path, else the cached snapshot of hub id `src` (e.g.
  "llava-hf/llava-1.5-7b-hf") in `cache_dir` (default: huggingface_hub's, i.e. $HF_HUB_CACHE or $HF_HOME/hub).
  ConversionError when it is neither."""
  if os.path.exists(src):
    return src
  if not _HUB_ID.match(src):
    raise ConversionError(f"{src} does not exist: give a checkpoint directory or a HuggingFace hub id "
                          "(owner/name) that is in the local HuggingFace cache")
  from huggingface_hub import constants, snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError
  try:
    return snapshot_download(src, cache_dir=cache_dir, local_files_only=True)
  except LocalEntryNotFoundError:
    raise ConversionError(
        f"{src} is neither a directory nor in the local HuggingFace cache ({cache_dir or constants.HF_HUB_CACHE}); "
        f"m3 convert never downloads: fetch it first with `huggingface-cli download {src}` (or "
        f"`hf download {src}`), or give its directory") from None
