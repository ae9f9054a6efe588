"""How every command line of the project ends on an expected error: one line, exit code 2.

Bad data, bad flags and missing files are the user's to fix, so they get `error: <what, where>`
on stderr and no traceback; `BUCKETED_RNN_DEBUG=1` shows the traceback when the line is not
enough. Anything else (a bug) keeps its traceback. Standard library only (matplotlib is
imported by `figure_file` alone, when a command writes a figure), so the numpy-only `bucketing`
can use it too.

    if __name__ == "__main__":
      sys.exit(cli_errors.run(main))
"""

import argparse
import contextlib
import json
import math
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Iterable

DEBUG_ENV = "BUCKETED_RNN_DEBUG"
USAGE_EXIT_CODE = 2


class UsageError(Exception):
  """An expected error whose message is already the one line to print."""


class AlreadyReported(UsageError):
  """An expected error a child process has already printed as its one line: `run` adds none."""


class Interrupted(Exception):
  """A command stopped by SIGINT before it had anything to show: `run` prints the message (what
  was kept, what was not) and returns the shell's code for death by SIGINT, as for Ctrl-C."""


# What bad input raises: ValueError (bad values, bad data, IamOnDbError, BadExampleError) and
# OSError (missing or unreadable files, a full disk).
EXPECTED_ERRORS = (UsageError, ValueError, OSError)


def one_line(message: object) -> str:
  """`message` (an error, or text) on one line: its non-blank lines joined by "; "."""
  return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run(main: Callable[[], int | None]) -> int:
  """Call `main()` and return its exit code; an expected error prints one line and returns 2.

  `main` returning something other than an int (e.g. the path of a written report) means 0.
  """
  try:
    code = main()
    sys.stdout.flush()  # here, so that a reader gone by now is caught below, not at exit
  except (KeyboardInterrupt, Interrupted) as interruption:
    # Ctrl-C where the program does not stop cleanly itself (loading data, measuring, compiling;
    # training checkpoints and returns): one line and the shell's code for death by SIGINT.
    if debugging():
      raise
    print(one_line(interruption) or "interrupted", file=sys.stderr)
    return 128 + signal.SIGINT
  except BrokenPipeError:
    # The reader went away (`| head`): end quietly, as a shell tool killed by SIGPIPE does, and
    # keep Python from reporting the same when it flushes stdout at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE
  except EXPECTED_ERRORS as error:
    if debugging():
      raise
    if isinstance(error, AlreadyReported):
      return USAGE_EXIT_CODE
    print(f"error: {one_line(error)}", file=sys.stderr)
    return USAGE_EXIT_CODE
  return code if isinstance(code, int) else 0


def shows_progress_bars() -> bool:
  """Whether stderr is a terminal or a notebook's, where a progress bar redraws in place; in a
  file or a pipe each redraw would be one more line of the log."""
  return sys.stderr.isatty() or "ipykernel" in sys.modules


def debugging() -> bool:
  """Whether `DEBUG_ENV` asks for tracebacks instead of one line."""
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose usage errors (a bad or missing flag) end as every expected error
  does, in one line under `run`, instead of the usage block; `--help` shows the description's
  first paragraph."""

  def __init__(self, *args, description: str | None = None, **kwargs):
    if description:
      description = description.strip().split("\n\n")[0]
    kwargs.setdefault("prog", main_command())
    super().__init__(*args, description=description, **kwargs)

  def error(self, message: str):
    raise UsageError(f"{self.prog}: {message} (see --help)")


def main_command() -> str | None:
  """How the running command was typed when it is a module run with `-m` ("python -m
  experiments.paper", not argparse's "paper.py"); None (argparse's own) otherwise."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is None or not spec.name:
    return None
  return f"python -m {spec.name.removesuffix('.__main__')}"


def positive_int(text: str) -> int:
  """An argparse type for a count of at least 1 (`--repeats`): 0 or less is named with its flag."""
  return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
  """An argparse type for an integer of at least 0 (a seed)."""
  return _int_at_least(text, 0)


def read_json_object(
  path: pathlib.Path, keys: tuple[str, ...] = (), writer: str = "the file this trainer writes there"
) -> dict:
  """A JSON object a command of this project wrote, with `keys`: a file that cannot be read, is
  damaged or is another's is a ValueError naming it and what it is not (`writer`), not a KeyError
  later."""
  try:
    value = json.loads(path.read_text())
  except OSError as error:
    raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
  except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: not a JSON object, so not {writer}")
  missing = [key for key in keys if key not in value]
  if missing:
    raise ValueError(f"{path}: no {', '.join(missing)}, so not {writer}")
  return value


def flat_keys(nested: dict, prefix: str = "") -> dict:
  """`{"model": {"hidden_size": 128}}` -> `{"model.hidden_size": 128}`: how the records a
  command writes and checks (`config.json`, a sweep's settings) name a nested field."""
  flat = {}
  for key, value in nested.items():
    name = f"{prefix}{key}"
    flat |= flat_keys(value, f"{name}.") if isinstance(value, dict) else {name: value}
  return flat


def differences(
  before: dict, now: dict, fields: Iterable[str] | None = None, prefix: str = ""
) -> list[str]:
  """How a record an earlier command wrote (there) and this command's (here) differ, sorted, as
  `"<prefix><field>=<before> there, <now> here"`: over `fields` (default: every field either
  holds; a field a record lacks shows as None in it), those whose values differ. The words every
  error and warning about a changed config or setting uses."""
  fields = before.keys() | now.keys() if fields is None else fields
  return [
    f"{prefix}{field}={before.get(field)!r} there, {now.get(field)!r} here"
    for field in sorted(fields)
    if before.get(field) != now.get(field)
  ]


def positive_float(text: str) -> float:
  """An argparse type for a finite number above 0 (minutes, epochs): NaN, infinities and 0 or
  less are named with their flag."""
  return _finite_float(text, above=True)


def non_negative_float(text: str) -> float:
  """An argparse type for a finite number of at least 0 (where 0 means none)."""
  return _finite_float(text, above=False)


def number(text: str) -> float:
  """An argparse type for any number (NaN and infinities too: a config checks its own)."""
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def integer(text: str) -> int:
  """An argparse type for any integer, named with its flag when it is not one."""
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _finite_float(text: str, above: bool) -> float:
  value = number(text)
  if not (math.isfinite(value) and (value > 0 if above else value >= 0)):
    raise argparse.ArgumentTypeError(
      f"must be a finite number {'>' if above else '>='} 0, got {text!r}"
    )
  return value


def _int_at_least(text: str, least: int) -> int:
  value = integer(text)
  if value < least:
    raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
  return value


def int_list(text: str) -> list[int]:
  """An argparse type for comma-separated integers ("2,4,8"): a typo is named with its flag."""
  try:
    return [int(value) for value in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"{text!r} is not a comma-separated list of integers"
    ) from None


def positive_int_list(text: str) -> list[int]:
  """`int_list` of counts of at least 1 (`--buckets`, `--devices`)."""
  values = int_list(text)
  if min(values) < 1:
    raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
  return values


def input_file(path: pathlib.Path, name: str, what: str) -> pathlib.Path:
  """`path`, checked to be a file before it is read: a folder (`is a folder, not {what}`) or
  nothing there (`no such file`) is an error that starts with `name` (the path, or the flag and
  the path as typed)."""
  if path.is_dir():
    raise ValueError(f"{name}: is a folder, not {what}")
  if not path.exists():
    raise FileNotFoundError(f"{name}: no such file")
  return path


def figure_file(flag: str, path: str) -> pathlib.Path:
  """The file a figure given as `flag path` will be written to, checked before any work.

  matplotlib adds ".png" to a name without a suffix and picks the format from the suffix; saying
  which file that is, and refusing a folder, a missing folder or a format it cannot write, keeps
  the printed path and any error about what the user typed.
  """
  from matplotlib.backend_bases import FigureCanvasBase

  file = output_path(flag, path)
  if not file.suffix:
    file = file.with_name(file.name + ".png")
  formats = FigureCanvasBase.get_supported_filetypes()
  if file.suffix[1:].lower() not in formats:
    raise UsageError(
      f"{flag} {path}: matplotlib cannot write {file.suffix!r} files; use .png or one of "
      f"{', '.join(sorted(formats))}"
    )
  return file


def output_path(flag: str, path: str, make_folder: bool = False) -> pathlib.Path:
  """The file (or path prefix) `flag path` names for writing, checked before any work: not a
  folder, in a folder that exists, or that `make_folder` makes."""
  file = pathlib.Path(path).expanduser()
  if path.endswith(os.sep) or file.is_dir():
    raise UsageError(f"{flag} {path}: names a folder; name a file in it")
  if file.parent.exists() and not file.parent.is_dir():
    raise UsageError(f"{flag} {path}: its folder {file.parent} is not a folder")
  if make_folder:
    with naming_write_errors(flag, file.parent):
      file.parent.mkdir(parents=True, exist_ok=True)
  elif not file.parent.is_dir():
    raise UsageError(f"{flag} {path}: its folder {file.parent} does not exist")
  return file


@contextlib.contextmanager
def naming_write_errors(flag: str, file: pathlib.Path):
  """A write of `file` that fails anyway (no permission, a full disk) named by its flag."""
  try:
    yield
  except OSError as error:
    raise OSError(f"{flag} {file}: cannot write it ({error.strerror or error})") from None
