"""Python configs and command-line overrides, with one-line errors for every mistake.

A config is a module with `get_config(arg=None)` returning a locked `ml_collections.ConfigDict`
(big_vision style). It is named on the command line as `--config=path/to/file.py[:arg]` and
overridden with `--config.a.b=value`. We parse overrides ourselves rather than through
`ml_collections.config_flags` so that a mistyped key is answered with the closest valid key and a
wrong type with the expected one, in one line, before anything is written.
"""

import ast
import difflib
import importlib.util
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from ftjax.errors import FtjaxError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and returns its `get_config(arg)`."""
  path_str, _, arg = spec.partition(':')
  path = pathlib.Path(path_str)
  if not path.is_file():
    raise FtjaxError(f'config file {path_str!r} does not exist: pass --config=configs/<name>.py')
  module_spec = importlib.util.spec_from_file_location(f'ftjax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  sys.path.insert(0, str(path.parent.absolute()))  # A config may build on a sibling config.
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise FtjaxError(f'config file {path_str} has a syntax error at line {e.lineno}: '
                     f'{e.msg}') from e
  finally:
    sys.path.remove(str(path.parent.absolute()))
  if not hasattr(module, 'get_config'):
    raise FtjaxError(f'config file {path_str} defines no get_config(arg=None) function')
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise FtjaxError(f'config {spec}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise FtjaxError(f'get_config() in {path_str} must return an ml_collections.ConfigDict')
  return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every leaf key of `config` in dotted form (`optim.lr`)."""
  keys = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, f'{prefix}{name}.'))
    else:
      keys.append(f'{prefix}{name}')
  return keys


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Turns the override text into a value of the type the field already has."""
  if isinstance(current, str):
    return text
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ('true', '1', 'yes'):
      return True
    if lowered in ('false', '0', 'no'):
      return False
    raise FtjaxError(f'--config.{key} expects true or false, got {text!r}')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  kind = type(current).__name__
  if isinstance(current, int):
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise FtjaxError(f'--config.{key} expects an integer, got {text!r}')
  if isinstance(current, float):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise FtjaxError(f'--config.{key} expects a number (float), got {text!r}')
  if isinstance(current, (tuple, list)):
    if isinstance(value, (int, float)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise FtjaxError(f'--config.{key} expects a {kind} such as {current!r}, got {text!r}')
    return type(current)(value)
  if current is None:
    return value
  if not isinstance(value, type(current)):
    raise FtjaxError(f'--config.{key} expects a {kind}, got {text!r}')
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `key=value` overrides (key dotted, without the `config.` prefix) in place.

  Raises:
    FtjaxError: for an unknown key (naming the closest valid one) or a value of the wrong type.
  """
  valid = flat_keys(config)
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise FtjaxError(f'override --config.{item} needs a value: --config.{key}=VALUE')
    if key not in valid:
      # The right leaf in the wrong section (`train.lr`) is the likeliest slip; then spelling.
      leaf = key.rsplit('.', 1)[-1]
      close = [k for k in valid if k.rsplit('.', 1)[-1] == leaf][:1]
      close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
      hint = f'; did you mean --config.{close[0]}?' if close else ''
      raise FtjaxError(f'unknown config key --config.{key}{hint}')
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    value = _parse_value(text, node[leaf], key)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:  # ConfigDict's own type check, as a last resort.
      raise FtjaxError(f'--config.{key}={text!r}: {e}') from e


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.key=value` overrides from the other command-line arguments."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' not in body and i + 1 < len(args) and not args[i + 1].startswith('--'):
        body = f'{body}={args[i + 1]}'  # `--config.optim.lr 3e-5` form.
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as stable, human-readable JSON (what the workdir keeps)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
