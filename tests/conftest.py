"""The one place that sets XLA_FLAGS: 8 CPU devices for every test, before JAX starts, and XLA's quick compile
(LLVM without its expensive passes: the suite's tiny programs spend more time compiling than running; the tests
compare results, not speed; `m3 train` subprocesses take their flags from tests/train/train_testlib.py or
launch/local.py's --xla-flags)."""
import os
import pathlib

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + FAST_COMPILE_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CLI's persistent compilation cache (m3_jax/compile_cache.py) stays inside this test session, never in the
# user's ~/.cache: tests that compare first and second starts get a cold cache, and nothing leaks between runs.
if "M3_COMPILATION_CACHE" not in os.environ:
  import tempfile
  os.environ["M3_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="m3_xla_cache_")

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.exists():
    pytest.fail(f"checkpoint fixtures not found at {FIXTURES} (CI runs with ../shared beside the checkout)")
  return FIXTURES
