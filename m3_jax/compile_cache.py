"""JAX's persistent compilation cache for the `m3` commands that compile (train, generate, eval, ...).

A second start of the same program reads its XLA executables from disk instead of compiling them again
(benchmarks/startup.py measures it). The cache lives in `$M3_COMPILATION_CACHE` when set (`off` turns it off),
else in `$JAX_COMPILATION_CACHE_DIR` when the user set JAX's own variable, else in
`$XDG_CACHE_HOME/m3_jax/xla` (`~/.cache/m3_jax/xla`). Every program is cached, however small or quick to compile:
the tiny CPU programs of tests and the demo are the ones whose compile time dominates a start.
"""
from __future__ import annotations

import os

ENV = "M3_COMPILATION_CACHE"
OFF = ("off", "none", "0", "false", "")


def default_dir() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "m3_jax", "xla")


def directory() -> str | None:
  """The cache directory this process uses, or None when the cache is off."""
  if ENV in os.environ:
    value = os.environ[ENV].strip()
    return None if value.lower() in OFF else value
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()


def enable() -> str | None:
  """Points JAX at the cache directory (before the first compile) -> that directory, or None when off.
  An object-store directory (gs://...) is passed as it is: JAX's cache writes through etils.epath."""
  path = directory()
  if path is None:
    return None
  import jax
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
