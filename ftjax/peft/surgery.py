"""What every PEFT method needs to operate on an NNX model: find modules, swap one in place."""

import re

from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.models import layers


def path_str(path: tuple) -> str:
  """A module path as 'encoder/layers/0/attention/query' ('(root)' for the model itself)."""
  return '/'.join(map(str, path)) or '(root)'


def modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """Every submodule of `model` with its path, the model itself first."""
  return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]


def linear_examples(found: list[tuple[tuple, nnx.Module]], limit: int = 8) -> str:
  """A short list of the linear layers' paths, for 'your regex matched nothing' errors."""
  # Per-layer repeats collapse to '*' so that the hint stays one short line.
  seen: dict[str, None] = {}
  for path, node in found:
    if isinstance(node, nnx.Linear):
      seen[re.sub(r'(?<=/)\d+(?=/|$)', '*', path_str(path))] = None
  names = list(seen)
  more = f', ... (+{len(names) - limit} more)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more if names else '(none)'


def replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Puts `new` where the module at `path` was (an attribute or a list entry)."""
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def match_linears(model: nnx.Module, targets: str, method: str,
                  also: type | None = None) -> list[tuple[tuple, nnx.Module]]:
  """The modules whose path `targets` searches, checked to be plain linear layers.

  Exactly a plain linear layer (`layers.PLAIN_LINEARS`): a subclass is another method's
  wrapper, whose call a second wrapper would bypass. `also` admits the method's own wrapper
  (LoRA adds adapters to its layers).

  Raises:
    FtjaxError: for an invalid regex, no match (naming where the linear layers are), or a match
      that is not a plain linear layer (naming it and what it is).
  """
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise FtjaxError(f'{method} targets {targets!r} is not a valid regular expression: '
                     f'{e}') from e
  found = modules(model)
  matched = [(path, node) for path, node in found if pattern.search(path_str(path))]
  if not matched:
    raise FtjaxError(f'{method} targets {targets!r} match no module: linear layers are at '
                     f'{linear_examples(found)}')
  for path, node in matched:
    if type(node) in layers.PLAIN_LINEARS or (also is not None and isinstance(node, also)):
      continue
    what = 'adapted already' if isinstance(node, nnx.Linear) else 'not a linear layer'
    raise FtjaxError(f'{method} targets {targets!r} match {path_str(path)}, a '
                     f'{type(node).__name__} and {what}: narrow the regex (anchor it with $) '
                     'to plain linear layers')
  return matched


def take_over(wrapper: nnx.Linear, base: nnx.Linear) -> None:
  """Makes `wrapper` (a Linear subclass built without Linear.__init__) use `base`'s parameters.

  Linear.__init__ would create fresh weights; a PEFT wrapper instead keeps the very `kernel`
  and `bias` Params of the layer it replaces, so their state paths (and the HF key map) hold.
  """
  for key, value in vars(base).items():
    if key.startswith('_') or key in ('kernel', 'bias'):
      continue
    setattr(wrapper, key, value)
  wrapper.kernel = base.kernel
  wrapper.bias = nnx.data(base.bias)
