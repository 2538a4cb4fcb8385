"""The user-error types, and the rule the `m3` command uses to tell a user's mistake from a bug.

A user error is something the person running m3 can fix: a value, a path, a file's content, a checkpoint that does
not fit. `m3` prints it as one line, `m3 <command>: error: <message>`, and exits 2; a bug keeps its traceback.
The message names the offending value (the file and line, the record, the key) and what was expected.

What counts as a user error (`is_user_error`):
  * a `UserError`: one subclass per kind below (a value, a path, a file's content, a checkpoint that does not fit);
    the domain errors such as `data.errors.BadRecord`, `convert.hf.ConversionError` or `geometry.AnyresError`
    derive from them;
  * an OSError about a path the user named (missing, a directory, not a directory, no permission, exists): the
    error carries the path;
  * a ValueError, KeyError or TypeError raised by a `raise` statement in m3_jax's own code: a deliberate check,
    written with a message for the user. The same types raised by Python itself or by a library (an unpacking in
    m3_jax, numpy, jax, json) are bugs and keep their traceback.
"""
from __future__ import annotations

import linecache
import pathlib

_PACKAGE = str(pathlib.Path(__file__).resolve().parent)


class UserError(Exception):
  """Something the user gave that m3 cannot use; the message names it and what was expected."""


class BadValue(UserError, ValueError):
  """An argument, option or config value outside what it may be (a scale not in the chain, an unknown task, a batch
  size the devices do not divide, an input longer than the model's context)."""


class BadPath(UserError, OSError):
  """A path that does not exist or is the wrong kind (a file where a folder was expected, or the reverse), or that
  leaves the folder it must stay in."""


class BadFile(UserError, ValueError):
  """A file whose content cannot be used: not UTF-8, not JSON, empty, a bad record, a path leaving its folder."""


class Incompatible(UserError, ValueError):
  """A checkpoint, router or output folder that does not fit what it is used with."""


class InputTooLong(BadValue):
  """A prompt (visual tokens included) plus the tokens to generate that exceed the model's context."""


PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
CHECK_ERRORS = (ValueError, KeyError, TypeError)


def not_utf8(path, data: bytes, error: UnicodeDecodeError) -> BadFile:
  """A BadFile naming `path` and the 1-based line of the first byte that is not UTF-8 (`data`: the bytes decoded)."""
  line = data[:error.start].count(b"\n") + 1
  return BadFile(f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                 "expected a UTF-8 file")


def read_text(path) -> str:
  """A UTF-8 text file; not UTF-8 is a BadFile naming the file and line."""
  data = pathlib.Path(path).read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise not_utf8(path, data, e) from None


def _raised_by_check(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is a `raise` statement in m3_jax's source."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  file = tb.tb_frame.f_code.co_filename
  if not file.startswith(_PACKAGE):
    return False
  return linecache.getline(file, tb.tb_lineno).lstrip().startswith("raise ")


def is_user_error(error: BaseException) -> bool:
  """See the module docstring: a UserError, a path OSError, or a check's ValueError / KeyError / TypeError."""
  if isinstance(error, (UserError, *PATH_ERRORS)):
    return True
  return isinstance(error, CHECK_ERRORS) and _raised_by_check(error)


def message(error: BaseException) -> str:
  """The text shown for a user error: KeyError's quotes dropped, an OSError's path named."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    return error.args[0]
  if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename is not None:
    return f"{error.filename}: {error.strerror or error}"
  return str(error) or type(error).__name__
