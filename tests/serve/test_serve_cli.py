"""`m3 serve`'s flag checks: a bad value is one `m3 serve: error:` line and exit 2, before the checkpoint loads."""
import pytest

from m3_jax.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--data-parallel", "0"], "--data-parallel 0: expected >= 1"),
    (["--max-batch", "0"], "--max-batch 0: expected >= 1"),
    (["--data-parallel", "2", "--batching", "continuous"], "--data-parallel 2 needs --batching static"),
    (["--allowed-image-dir", "/nonexistent/images"], "--allowed-image-dir /nonexistent/images: not a directory"),
])
def test_bad_flags_are_one_error_line_and_exit_2(tmp_path, capsys, flags, message):
  assert main(["serve", "--ckpt", str(tmp_path / "never-loaded")] + flags) == 2
  err = capsys.readouterr().err
  assert err.startswith("m3 serve: error: ") and message in err and err.count("\n") == 1, err
