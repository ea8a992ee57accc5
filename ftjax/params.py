"""The parameter policy: which parameters train, at what learning rate, with what weight decay.

A policy is an ordered list of `(regex over parameter paths, Rule)`. Every parameter must be
matched by exactly one rule: a path that no rule matches, or that two rules match, is an error
that names it (big_vision's habit: a silent default is how a layer ends up frozen by accident).
Presets build the list from the model's structure so that the common recipes are one config
line; `policy.preset='custom'` takes `policy.rules` as written.

Paths look like `encoder/layers/3/attention/query/kernel`, `encoder/embeddings/...`,
`classifier/kernel` (the new head).
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from ftjax import launch
from ftjax.errors import FtjaxError
from ftjax.models import layers

HEAD = r'^classifier/'  # The new output layer; trainable under every preset.
# The input embeddings of every family: BERT/RoBERTa/ViT `embeddings/`, Llama `embed_tokens/`,
# GPT-2 `wte/` and `wpe/`. They sit below block 0 for the layer-wise presets.
EMBEDDINGS = r'(^|/)(embeddings|embed_tokens|wte|wpe)/'
_LAYER = re.compile(r'(?:^|/)layers/(\d+)/')
PRESETS = ('full', 'head_only', 'freeze_lower', 'layerwise_lr_decay', 'gradual_unfreeze',
           'bitfit', 'peft', 'custom')


@dataclasses.dataclass(frozen=True)
class Rule:
  """What happens to the parameters one regex matches.

  Attributes:
    trainable: False keeps them frozen for the whole run (no gradients, no optimizer state).
    lr_mult: multiplies the schedule's learning rate for this group.
    weight_decay: None decays matrices but not biases and norms (the default); True or False
      forces it on or off for the whole group.
    unfreeze_step: the group is frozen until this optimizer step, then trains (0: from the start).
  """
  trainable: bool = True
  lr_mult: float = 1.0
  weight_decay: bool | None = None
  unfreeze_step: int = 0

  def __post_init__(self):
    if self.lr_mult < 0:
      raise FtjaxError(f'a policy rule has lr_mult={self.lr_mult}; it must be >= 0')
    if self.unfreeze_step < 0:
      raise FtjaxError(f'a policy rule has unfreeze_step={self.unfreeze_step}; it must be >= 0')


FROZEN = Rule(trainable=False)


@dataclasses.dataclass(frozen=True)
class Group:
  """The parameters one rule matched, as the optimizer and the report see them."""
  name: str  # The rule's regex.
  rule: Rule
  paths: tuple[str, ...]
  num_params: int


def path_str(keypath) -> str:
  """A jax key path (of an nnx.State) as 'a/b/c', without nnx.Variable's own 'value' level.

  Only a trailing 'value' is the Variable's: BERT's attention has a module named 'value' too.
  """
  names = [str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', None)))) for k in keypath]
  if names and names[-1] == 'value':
    names.pop()
  return '/'.join(names)


def param_paths(model: nnx.Module) -> dict[str, Any]:
  """Every `nnx.Param` of `model` (LoRA parameters included) by its '/'-joined path."""
  return {'/'.join(map(str, path)): variable
          for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def num_layers(paths: Sequence[str]) -> int:
  layers = {int(m.group(1)) for p in paths if (m := _LAYER.search(p))}
  return max(layers) + 1 if layers else 0


def preset_rules(policy: ml_collections.ConfigDict, paths: Sequence[str],
                 peft: str | None = None) -> list[tuple[str, Rule]]:
  """The rule list of a named preset for a model whose parameters have `paths`.

  `peft` is the regex of the variables a PEFT method added; only the 'peft' preset (they and
  the head train, all else is frozen) and 'custom' rules may be combined with one.
  """
  preset = policy.preset
  # A causal LM keeps its pretrained lm_head and has no new head: the head rules drop out.
  head = [(HEAD, Rule())] if any(re.search(HEAD, p) for p in paths) else []
  if not head and preset == 'head_only':
    raise FtjaxError("policy.preset='head_only' needs a new head (classifier/), and this model "
                     "has none (a causal LM keeps its pretrained lm_head): use 'peft' or 'full'")
  if peft and preset not in ('peft', 'custom'):
    raise FtjaxError(f"a PEFT method is configured, so policy.preset must be 'peft' (or "
                     f"'custom' rules that cover its variables), not {preset!r}")
  if preset == 'peft':
    if not peft:
      raise FtjaxError("policy.preset='peft' needs a peft.method (e.g. --config.peft.method=lora)")
    return head + [(peft, Rule()), (rf'^(?!{HEAD[1:]})(?!.*(?:{peft}))', FROZEN)]
  n = num_layers(paths)
  block = lambda i: rf'(^|/)layers/{i}/'
  if preset == 'full':
    return [('.*', Rule())]
  if preset == 'head_only':  # A linear probe on the frozen encoder.
    return [(HEAD, Rule()), (rf'^(?!{HEAD[1:]})', FROZEN)]
  if preset == 'bitfit':  # Biases only (Ben Zaken et al., 2022), plus the new head.
    return head + [(r'^(?!classifier/).*/bias$', Rule()),
                   (r'^(?!classifier/).*/(?!bias$)[^/]+$', FROZEN)]
  if preset == 'freeze_lower':
    k = policy.freeze_lower_layers
    if not 0 <= k <= n:
      raise FtjaxError(f'policy.freeze_lower_layers={k} but the model has {n} layers')
    lower = '|'.join(str(i) for i in range(k))
    rules = [(EMBEDDINGS, FROZEN)]
    if k:
      rules.append((rf'(^|/)layers/({lower})/', FROZEN))
    return rules + [(rf'^(?!.*{EMBEDDINGS})(?!.*(^|/)layers/(' + (lower or '-1') + r')/)',
                     Rule())]
  if preset == 'layerwise_lr_decay':
    # Multiplier decay ** (num_layers - i) for block i: the top block gets `decay`, the
    # embeddings (below block 0) the smallest, decay ** (num_layers + 1); the head gets 1.
    d = policy.layer_decay
    if not 0 < d <= 1:
      raise FtjaxError(f'policy.layer_decay must be in (0, 1], got {d}')
    rules = head + [(EMBEDDINGS, Rule(lr_mult=d ** (n + 1)))]
    rules += [(block(i), Rule(lr_mult=d ** (n - i))) for i in range(n)]
    return rules + _rest_of_encoder(paths, rules)
  if preset == 'gradual_unfreeze':
    # ULMFiT: the head first, then the top block, one more block every `unfreeze_every` steps,
    # the embeddings last.
    every = policy.unfreeze_every
    if every <= 0:
      raise FtjaxError(f'policy.unfreeze_every must be a positive step count, got {every}')
    rules = list(head)
    rules += [(block(i), Rule(unfreeze_step=every * (n - i))) for i in range(n)]
    rules += [(EMBEDDINGS, Rule(unfreeze_step=every * (n + 1)))]
    return rules + _rest_of_encoder(paths, rules)
  if preset == 'custom':
    return parse_rules(policy.rules)
  raise FtjaxError(f'unknown policy.preset {preset!r}; choose one of {", ".join(PRESETS)}')


def _rest_of_encoder(paths, rules) -> list[tuple[str, Rule]]:
  """Any parameter no block or embedding rule covers (e.g. a final norm) trains at full rate."""
  covered = [re.compile(r) for r, _ in rules]
  rest = [p for p in paths if not any(c.search(p) for c in covered)]
  return [('^(' + '|'.join(re.escape(p) for p in rest) + ')$', Rule())] if rest else []


def parse_rules(raw) -> list[tuple[str, Rule]]:
  """Turns config rules `((regex, {field: value, ...}), ...)` into `(regex, Rule)` pairs."""
  if not raw:
    raise FtjaxError("policy.preset='custom' needs policy.rules, e.g. "
                     "((r'^classifier/', {}), ('.*', {'trainable': False}))")
  rules = []
  fields = {f.name for f in dataclasses.fields(Rule)}
  for item in raw:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise FtjaxError(f'policy rule {item!r} must be a pair (regex, {{field: value}})')
    regex, spec = item
    spec = dict(spec or {})
    unknown = set(spec) - fields
    if unknown:
      raise FtjaxError(f'policy rule {regex!r} has unknown field(s) {sorted(unknown)}; '
                       f'fields are {sorted(fields)}')
    rules.append((regex, Rule(**spec)))
  return rules


def resolve(rules: Sequence[tuple[str, Rule]], paths: Sequence[str],
            num_params: dict[str, int]) -> list[Group]:
  """Assigns every path to exactly one rule.

  Raises:
    FtjaxError: for an invalid regex, a rule that matches nothing, a path matched by two rules,
      or a path that no rule matches (each names the offending regex or paths).
  """
  compiled = []
  for regex, rule in rules:
    try:
      compiled.append((regex, re.compile(regex), rule))
    except re.error as e:
      raise FtjaxError(f'policy regex {regex!r} is invalid: {e}') from e
  owner: dict[str, str] = {}
  members: dict[str, list[str]] = {regex: [] for regex, _, _ in compiled}
  for path in paths:
    hits = [regex for regex, pattern, _ in compiled if pattern.search(path)]
    if len(hits) > 1:
      raise FtjaxError(f'parameter {path} is matched by more than one policy rule '
                       f'({hits[0]!r} and {hits[1]!r}); make the rules disjoint')
    if hits:
      owner[path] = hits[0]
      members[hits[0]].append(path)
  unmatched = [p for p in paths if p not in owner]
  if unmatched:
    shown = ', '.join(unmatched[:3]) + (f' (+{len(unmatched) - 3} more)' if len(unmatched) > 3
                                        else '')
    raise FtjaxError(f'no policy rule matches {shown}; add a rule for them (e.g. ".*")')
  groups = []
  for regex, _, rule in compiled:
    if not members[regex]:
      raise FtjaxError(f'policy rule {regex!r} matches no parameter; paths look like '
                       f'{paths[0]}')
    groups.append(Group(regex, rule, tuple(members[regex]),
                        sum(num_params[p] for p in members[regex])))
  return groups


def build_policy(policy: ml_collections.ConfigDict, model: nnx.Module,
                 peft: str | None = None) -> list[Group]:
  """The resolved groups of `model`'s parameters under the configured policy."""
  params = param_paths(model)
  paths = list(params)
  sizes = {p: int(v.get_value().size) for p, v in params.items()}
  return resolve(preset_rules(policy, paths, peft), paths, sizes)


def hold_frozen_in_compute_dtype(model: nnx.Module, groups: Sequence[Group]) -> tuple[int, int]:
  """Holds every parameter that never trains in the compute dtype of its layer, where each use
  casts it to that dtype anyway (`layers.params_cast_on_use`); in place.

  A bfloat16 run then keeps its frozen weights (LoRA's base model, a linear probe's encoder) at
  half the memory (on CPU the freed pages go back to the OS: `launch.release_freed_host_memory`),
  and its steps no longer cast them: the results are the same bits, since the float32 value was
  rounded to the same dtype at every use. Parameters that train in any phase,
  gradual unfreezing included, stay float32 master weights. Meant for the training loop's copy
  of the model: a model being exported or merged (LoRA, IA3) needs its float32 weights.

  Returns:
    (parameters cast, bytes saved).
  """
  ever_trained = frozenset(p for g in groups if g.rule.trainable for p in g.paths)
  count = saved = 0
  for path, module in nnx.iter_graph(model):
    dtype = getattr(module, 'dtype', None) if isinstance(module, nnx.Module) else None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      continue
    for name in layers.params_cast_on_use(module):
      variable = getattr(module, name, None)
      if (not isinstance(variable, nnx.Param)
          or '/'.join(map(str, (*path, name))) in ever_trained
          or not jnp.issubdtype(variable.dtype, jnp.floating)
          or jnp.dtype(dtype).itemsize >= jnp.dtype(variable.dtype).itemsize):
        continue
      # One weight at a time, each float32 copy dropped as its cast lands. Casting them all in
      # one compiled call is 0.3 s faster for MiniLM, but with every float32 copy still alive
      # while the casts are allocated, glibc could not give the freed pages back: Llama-100M
      # LoRA's bfloat16 peak was 2,325-2,355 MiB that way against 2,166-2,168 one at a time.
      value = variable.get_value()
      variable.set_value(value.astype(dtype))  # Keeps the value's sharding.
      count += value.size
      saved += value.nbytes - variable.get_value().nbytes
  if count:
    launch.release_freed_host_memory()  # On CPU, the float32 copies' pages go back to the OS.
  return count, saved


def trainable_paths(groups: Sequence[Group], step: int) -> frozenset[str]:
  """The paths that train at optimizer step `step` (gradual unfreezing changes this set)."""
  return frozenset(p for g in groups if g.rule.trainable and g.rule.unfreeze_step <= step
                   for p in g.paths)


def phase_starts(groups: Sequence[Group]) -> list[int]:
  """Steps at which the trainable set changes (0 first): one compilation per phase."""
  return sorted({0} | {g.rule.unfreeze_step for g in groups if g.rule.trainable})


def trainable_filter(paths: frozenset[str]):
  """An nnx filter selecting exactly the parameters whose path is in `paths`."""
  return nnx.All(nnx.Param, lambda path, _: '/'.join(map(str, path)) in paths)


def format_table(groups: Sequence[Group], base_lr: float, weight_decay: float) -> str:
  """The table printed before step 1: one row per rule, then the trainable fraction."""
  header = ('group (regex)', 'params', 'trainable', 'lr', 'weight decay', 'unfreeze step')
  rows = []
  for g in groups:
    wd = {None: f'{weight_decay:g} (not biases/norms)', True: f'{weight_decay:g}',
          False: 'off'}[g.rule.weight_decay]
    rows.append((g.name, f'{g.num_params:,}', 'yes' if g.rule.trainable else 'no',
                 f'{base_lr * g.rule.lr_mult:.3g}' if g.rule.trainable else '-',
                 wd if g.rule.trainable else '-',
                 str(g.rule.unfreeze_step) if g.rule.trainable else '-'))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  total = sum(g.num_params for g in groups)
  trained = sum(g.num_params for g in groups if g.rule.trainable)
  rule = '-' * len(line(header))
  summary = f'trainable: {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)'
  return '\n'.join([rule, line(header), rule, *map(line, rows), rule, summary])
