"""Config flags whose mistakes read as one line.

`ml_collections.config_flags` reports a misspelt `--config.bucketing.num_bukets=8` as a chained
traceback whose "Did you mean" hint comes out escaped, and an unknown variant or a missing config
file as a traceback inside the message. `parse_flags` turns all of these into a
`cli_errors.UsageError` naming the flag; `cli_errors.run` prints it as one line, exit code 2.

    app.run(main, flags_parser=experiments.cli.parse_flags)   # train.py, under cli_errors.run
    config = experiments.cli.load_config(["prog", "--config=experiments/iam.py:tiny"])
    config = experiments.cli.override(config, ["model.hidden_size=96"], "--set wide")  # recipe.py
"""

import copy
import json
import pathlib
import re
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from cli_errors import UsageError, differences, flat_keys, one_line, read_json_object
from experiments import common

_HINT = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from or while handling, outermost first."""
  chain = [error]
  while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
    chain.append(inner)
  return chain


def _flag_of(argv: list[str], field: str) -> str:
  """The `--config.a.b=v` argument of argv whose path holds `field`; else the config file's flag,
  since then its `get_config()` set the field."""
  for argument in argv:
    path = argument.lstrip("-").split("=", 1)[0]
    if field in path.split(".")[1:]:
      return argument
  return _config_file_flag(argv)


def _config_file_flag(argv: list[str]) -> str:
  """`--name=file.py[:variant]`: the config file flag of argv (also given as `--name file.py`)."""
  for argument, following in zip(argv, [*argv[1:], ""], strict=True):
    flag, _, value = argument.partition("=")
    value = value or following
    if re.fullmatch(r"--?\w+", flag) and value.split(":")[0].endswith(".py"):
      return f"{flag}={value}"
  return "--config"


def flag_error_message(error: BaseException, argv: list[str]) -> str:
  """One line for an error raised while parsing `argv` or reading a config flag's value."""
  chain = _chain(error)
  for inner in chain:
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    hint = _HINT.search(str(text))
    if hint:  # A misspelt field: ConfigDict's KeyError, re-raised as AttributeError.
      suggestion, field = hint.groups()
      return f"{_flag_of(argv, field)}: no config field {field!r}; did you mean {suggestion!r}?"
  for inner in chain:
    if isinstance(inner, KeyError) and inner.args:  # A field with no near miss.
      field = str(inner.args[0]).splitlines()[0].strip("'\"")
      return f"{_flag_of(argv, field)}: no config field {field!r}"
  head = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
  if "Error whilst parsing config file" in head:  # The config file's get_config raised.
    flag = head.split(": Error whilst parsing config file")[0].removeprefix("flag ")
    return f"{flag}: {one_line(chain[-1])}"
  if "has no attribute 'get_config'" in head:  # A config file that defines no get_config().
    return f"{_config_file_flag(argv)}: defines no get_config()"
  if "Failed loading config file" in str(error):  # Missing or unreadable config file.
    return f"--config: {str(error).strip().splitlines()[-1].strip()}"
  return one_line(error).removeprefix("flag ")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parse `argv` (argv[0] is the program) into `flag_values`; returns the other arguments.

  Every flag's value is read once here, so a config file that fails to load fails now, as one
  UsageError, not later inside the program. `--config.a.b=None` unsets a field declared optional
  (a `FieldReference` with a type, such as `data.test_split`); config_flags alone would parse it
  as the field's type (the text "None", or an error for a number). A flag_parser for
  `absl.app.run`.
  """
  unsets = [match for argument in argv[1:] if (match := _UNSET.fullmatch(argument))]
  unsets = [match for match in unsets if match["name"] in flag_values]
  try:
    remaining = flag_values([arg for arg in argv if not any(arg == m[0] for m in unsets)])
    for name in flag_values:
      # A config file that failed to load is kept as an object raising its error on any
      # attribute access; this access makes it raise here.
      hasattr(getattr(flag_values, name), "keys")
  except Exception as error:  # ml_collections raises AttributeError, OSError, flags.Error, ...
    raise UsageError(flag_error_message(error, argv)) from error
  for match in unsets:
    _unset(getattr(flag_values, match["name"]), match["path"].split("."), match[0])
  return remaining


_UNSET = re.compile(r"--?(?P<name>\w+)\.(?P<path>[\w.]+)=None")


def _unset(config: ml_collections.ConfigDict, path: list[str], argument: str) -> None:
  """Sets the optional field at `path` of `config` to None; UsageError naming `argument` else."""
  *parents, leaf = path
  node = config
  for key in parents:
    node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
  fields = dict(node.items(preserve_field_references=True)) if node is not None else {}
  if leaf not in fields:
    raise UsageError(f"{argument}: no config field {'.'.join(path)!r}")
  if not isinstance(fields[leaf], ml_collections.FieldReference):
    raise UsageError(f"{argument}: config.{'.'.join(path)} is not optional; it cannot be None")
  setattr(node, leaf, None)


def load_config(argv: list[str], name: str = "config") -> ml_collections.ConfigDict:
  """The locked ConfigDict of `--{name}=file.py[:variant]` and its `--{name}.a.b=v` overrides.

  Raises UsageError (one line, naming the flag) for a misspelt field, a value of the wrong type,
  an unknown variant, a missing file, or no `--{name}` at all.
  """
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    name, None, "experiment config file", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  parse_flags(argv, flag_values)
  return config_value(flag_values[name])


def config_value(flag: flags.Flag) -> ml_collections.ConfigDict:
  """The ConfigDict of a parsed `--config=file.py[:variant]` flag. Raises UsageError naming the
  flag when it was not given, or when the file's `get_config()` returned something else (None:
  a missing `return`), which config_flags accepts and the program would trip over later."""
  if not flag.present:
    raise UsageError(f"--{flag.name} is required, e.g. --{flag.name}=experiments/synthetic.py")
  where = f"--{flag.name}={config_flags.get_config_filename(flag)}"
  if not isinstance(flag.value, ml_collections.ConfigDict):
    returned = "None" if flag.value is None else f"a {type(flag.value).__name__}"
    raise UsageError(f"{where}: get_config() returned {returned}, not an ml_collections.ConfigDict")
  # A config built from scratch would end in an AttributeError wherever the trainer first reads a
  # field it lacks.
  missing = sorted(
    flat_keys(common.base_config().to_dict()).keys() - flat_keys(flag.value.to_dict())
  )
  if missing:
    raise UsageError(
      f"{where}: get_config() lacks {len(missing)} of the trainer's fields "
      f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); build it on "
      "experiments.common.base_config()"
    )
  return flag.value


def override(
  config: ml_collections.ConfigDict, assignments: Sequence[str], where: str
) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `field=value` assignments, parsed as `--config.field=value`
  is (by the field's type, so `0` sets a float field to 0.0 and a string needs no quotes).

  Raises UsageError starting with `where` for a misspelt field or a value of the wrong type.
  """
  argv = ["", *(f"--config.{assignment}" for assignment in assignments)]
  flag_values = flags.FlagValues()
  try:
    holder = config_flags.DEFINE_config_dict(  # a misspelt field raises AttributeError here
      "config",
      copy.deepcopy(config),  # keeps the field references: an unset field keeps its type
      flag_values=flag_values,
      lock_config=True,
      sys_argv=argv,
    )
    parse_flags(argv, flag_values)
  except UsageError as error:
    message = str(error)
  except AttributeError as error:
    message = flag_error_message(error, argv)
  else:
    return holder.value
  raise UsageError(f"{where}: {message.removeprefix('--config.')}")


def check_settings(
  path: pathlib.Path, settings: dict, what: str, trained_with: str | None = None
) -> None:
  """Refuses, naming what differs, a workdir whose `path` (JSON) holds other settings than
  `settings`: a finished run is reused, so its settings must be this command's. Writes nothing:
  check every run first, then `record_settings` each, so that a refused command records nothing.

  `trained_with` names the trainer's own record (`config.json`, every field flat) in `path`'s
  folder: a folder a run wrote to before `path` existed is checked against the fields of
  `settings["config"]` that record holds, and refused when it has neither file or they share none.
  """
  now = flat_keys(json.loads(json.dumps(settings)))
  if path.is_file():
    source, before = path, flat_keys(read_json_object(path))
  elif trained_with and path.parent.is_dir() and any(path.parent.iterdir()):
    source = path.parent / trained_with
    recorded = read_json_object(source) if source.is_file() else {}
    now = {
      key: value
      for key, value in now.items()
      if key.startswith("config.") and key.removeprefix("config.") in recorded
    }
    if not now:
      raise UsageError(
        f"{path.parent} holds {what} with no record of its settings (neither {path.name} nor a "
        f"{trained_with} that names its config); use a new --workdir"
      )
    before = {key: recorded[key.removeprefix("config.")] for key in now}
  else:
    return
  differ = differences(before, now)
  if differ:
    shown = "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
    raise UsageError(
      f"{path.parent} holds {what} with other settings ({shown}; compare {source}); use a new "
      "--workdir"
    )


def record_settings(path: pathlib.Path, settings: dict) -> None:
  """Writes the settings `check_settings` accepted, for the next command to be checked against."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(settings, indent=2))
