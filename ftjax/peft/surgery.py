"""What every PEFT method needs to operate on an NNX model: find modules, swap one in place."""

import re

from flax import nnx


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
