"""LoRA adapters in the Hugging Face PEFT on-disk format (adapter_config.json + safetensors).

`save_lora_adapter` writes an ftjax LoRA adapter so that `peft.PeftModel.from_pretrained(base,
dir)` loads it onto the reference encoder (e.g. `transformers.BertModel`), and
`load_lora_adapter` reads such a directory (written by PEFT or by ftjax) into an ftjax model.

The file describes the encoder only: for a `SequenceClassifier` the adapter of its `encoder` is
written under the names PEFT gives a `PeftModel` around the bare encoder
(`base_model.model.encoder.layer.0.attention.self.query.lora_A.weight`), and the classification
head is not part of it (save the head with the training checkpoint).

Module names come from the model family's Hugging Face key map (a linear layer is a '.weight'
that maps to a 'kernel'), so nothing here names a BERT module. PEFT stores `lora_A.weight` as
[r, in] and `lora_B.weight` as [out, r], the transposes of ftjax's `lora_a` [in, r] and
`lora_b` [r, out].
"""

from collections.abc import Callable, Sequence
import json
import logging
import math
import os
import pathlib
import re
from typing import Any

from flax import nnx
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from ftjax import models
from ftjax.errors import FtjaxError
from ftjax.hub import read_bf16
from ftjax.peft import ia3 as ia3_lib
from ftjax.peft.lora import (DEFAULT_ADAPTER, LoRALinear, apply_lora, magnitude_name,
                             set_active_adapter)

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = 'adapter_config.json'
ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'

# PeftModel wraps the base model as `base_model` (a LoraModel) whose `model` is the encoder.
_PEFT_PREFIX = 'base_model.model.'
_FACTOR_SUFFIXES = {'lora_A': '.lora_A.weight', 'lora_B': '.lora_B.weight',
                    'lora_magnitude': '.lora_magnitude_vector'}  # The last only with DoRA.

# PEFT config fields that change which modules are adapted or how: ftjax cannot honour a
# non-default value, so loading one would silently compute something else.
_UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    'rank_pattern': bool,
    'alpha_pattern': bool,
    'layers_to_transform': lambda v: v is not None and v != [],
    'modules_to_save': bool,
    'target_parameters': bool,
    'trainable_token_indices': bool,
    'fan_in_fan_out': bool,
    'lora_bias': bool,
    'bias': lambda v: v not in (None, 'none'),
}


# The encoder and its Hugging Face module names
# ------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
  return '/'.join(map(str, path))


def _encoder_of(model: nnx.Module) -> tuple[nnx.Module, str]:
  """The encoder inside `model` and its '/'-joined path prefix ('' when it is the model)."""
  if hasattr(getattr(model, 'config', None), 'model_type'):
    return model, ''
  encoder = getattr(model, 'encoder', None)
  if hasattr(getattr(encoder, 'config', None), 'model_type'):
    return encoder, 'encoder/'
  raise FtjaxError(
      f'{type(model).__name__} is neither an encoder (e.g. BertModel) nor a model with one at '
      '.encoder (e.g. SequenceClassifier): pass the model returned by hub.load_model/load_encoder'
  )


def _linear_modules(encoder: nnx.Module) -> dict[str, str]:
  """Every linear layer the encoder's family knows: HF module name -> '/'-joined NNX path."""
  family = models.get_family(encoder.config.model_type)
  modules = {}
  for key, mapping in family.hf_key_map(encoder.config).items():
    if key.endswith('.weight') and mapping.path[-1] == 'kernel':
      modules[key[: -len('.weight')]] = _path_str(mapping.path[:-1])
  return modules


def _present_linears(model: nnx.Module) -> dict[str, nnx.Linear]:
  return {
      _path_str(path): node for path, node in nnx.iter_graph(model)
      if isinstance(node, nnx.Linear)
  }


def _peft_targets(target_modules: str | Sequence[str], names: Sequence[str],
                  exclude: str | Sequence[str] | None = None) -> list[str]:
  """The module names PEFT adapts for `target_modules` (its `check_target_module_exists`)."""

  def matches(spec: str | Sequence[str], name: str) -> bool:
    if isinstance(spec, str):
      return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f'.{t}') for t in spec)

  return [n for n in names if matches(target_modules, n) and not (exclude and matches(exclude, n))]


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
  return alpha / (math.sqrt(rank) if use_rslora else rank)


def _factor_attrs(name: str) -> tuple[str, str]:
  # As lora._attr_names: the default adapter keeps the short names.
  return ('lora_a', 'lora_b') if name == DEFAULT_ADAPTER else (f'lora_a_{name}', f'lora_b_{name}')


# Saving
# ------------------------------------------------------------------------------


def save_lora_adapter(
    model: nnx.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    rank: int,
    alpha: float,
    use_rslora: bool = False,
    target_modules: str | Sequence[str] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> pathlib.Path:
  """Writes LoRA adapter `adapter_name` of the encoder in PEFT's format.

  The directory loads with `peft.PeftModel.from_pretrained(transformers.BertModel...(base),
  out_dir)`. Only the encoder's adapter is written: a `SequenceClassifier`'s head is not part of
  the file. Merged adapters are saved too (the factors are unchanged by merging).

  Args:
    model: an encoder (e.g. from `hub.load_encoder`) or a model holding one at `.encoder`, with
      LoRA applied by `lora.apply_lora`.
    out_dir: the directory to write (created if needed).
    base_model_name_or_path: written to the config; what `peft.AutoPeftModel` loads as the base.
    rank: r, checked against the factors.
    alpha: lora_alpha, checked against the layers' scaling (alpha/r, or alpha/sqrt(r)).
    use_rslora: whether the scaling is alpha/sqrt(r).
    target_modules: PEFT's target_modules (HF module names such as ['query', 'value'], or a
      regex fully matching module names). None derives them from the adapted layers.
    adapter_name: the ftjax adapter to write; PEFT files do not carry the name.

  Returns:
    `out_dir` as a path.

  Raises:
    FtjaxError: if the model has no such adapter, LoRA outside the encoder, a rank or scaling
      that disagrees with `rank`/`alpha`/`use_rslora`, or target_modules that do not select
      exactly the adapted layers.
  """
  encoder, prefix = _encoder_of(model)
  hf_names = {path: hf for hf, path in _linear_modules(encoder).items()}
  expected_scaling = _scaling(rank, alpha, use_rslora)
  a_attr, b_attr = _factor_attrs(adapter_name)

  adapted: dict[str, LoRALinear] = {}
  for path, layer in _present_linears(model).items():
    if not (isinstance(layer, LoRALinear) and layer.has_adapter(adapter_name)):
      continue
    hf = hf_names.get(path[len(prefix):]) if path.startswith(prefix) else None
    if hf is None:
      raise FtjaxError(
          f'LoRA adapter {adapter_name!r} on {path} is outside the encoder, and a PEFT file holds '
          'the encoder only: do not target head layers with LoRA when exporting to PEFT'
      )
    layer_rank = getattr(layer, a_attr).shape[1]
    if layer_rank != rank:
      raise FtjaxError(
          f'LoRA adapter {adapter_name!r} on {path} has rank {layer_rank}, not rank={rank}: pass '
          'the rank it was applied with'
      )
    layer_scaling = dict(layer.adapters)[adapter_name]
    if not math.isclose(layer_scaling, expected_scaling, rel_tol=1e-6):
      raise FtjaxError(
          f'LoRA adapter {adapter_name!r} on {path} scales by {layer_scaling:g}, but alpha={alpha} '
          f'with rank={rank} and use_rslora={use_rslora} gives {expected_scaling:g}: pass the '
          'alpha and use_rslora it was applied with'
      )
    adapted[hf] = layer
  if not adapted:
    raise FtjaxError(
        f'this model has no LoRA adapter named {adapter_name!r} on its encoder: call '
        'lora.apply_lora first, or pass the right adapter_name'
    )

  all_names = list(_linear_modules(encoder))
  if target_modules is None:
    target_modules = sorted({hf.rsplit('.', 1)[-1] for hf in adapted})
    if set(_peft_targets(target_modules, all_names)) != set(adapted):
      # Only some layers of a kind are adapted: name each module in full.
      target_modules = sorted(adapted)
  elif not isinstance(target_modules, str):
    target_modules = sorted(target_modules)
  targeted = set(_peft_targets(target_modules, all_names))
  # PEFT would adapt these too; harmless only where this model dropped the layer (the pooler).
  linears = _present_linears(model)
  present = {hf for hf, path in _linear_modules(encoder).items() if f'{prefix}{path}' in linears}
  extra = sorted((targeted - set(adapted)) & present)
  missed = sorted(set(adapted) - targeted)
  if extra or missed:
    detail = f'also select {extra[0]}, which has no adapter' if extra else f'miss {missed[0]}'
    raise FtjaxError(
        f'target_modules {target_modules!r} {detail}: pass target_modules=None to derive them '
        'from the adapted layers'
    )

  use_dora = any(adapter_name in layer.dora for layer in adapted.values())
  if use_dora and not all(adapter_name in layer.dora for layer in adapted.values()):
    raise FtjaxError(f'LoRA adapter {adapter_name!r} is DoRA on some layers only; a PEFT file '
                     'is one or the other')
  tensors = {}
  for hf, layer in sorted(adapted.items()):
    # float32 whatever the parameter dtype: numpy (and so safetensors.numpy) has no bfloat16.
    a = np.asarray(getattr(layer, a_attr)[...], np.float32)
    b = np.asarray(getattr(layer, b_attr)[...], np.float32)
    tensors[f'{_PEFT_PREFIX}{hf}.lora_A.weight'] = np.ascontiguousarray(a.T)
    tensors[f'{_PEFT_PREFIX}{hf}.lora_B.weight'] = np.ascontiguousarray(b.T)
    if use_dora:
      tensors[f'{_PEFT_PREFIX}{hf}.lora_magnitude_vector'] = np.asarray(
          getattr(layer, magnitude_name(adapter_name))[...], np.float32)

  config = {
      'peft_type': 'LORA',
      # The file describes the bare encoder, which PEFT calls feature extraction.
      'task_type': 'FEATURE_EXTRACTION',
      'base_model_name_or_path': base_model_name_or_path,
      'r': rank,
      'lora_alpha': alpha,
      'use_rslora': use_rslora,
      'target_modules': target_modules,
      'exclude_modules': None,
      'lora_dropout': 0.0,
      'bias': 'none',
      'fan_in_fan_out': False,
      'inference_mode': True,
      'init_lora_weights': True,
      'modules_to_save': None,
      'layers_to_transform': None,
      'layers_pattern': None,
      'rank_pattern': {},
      'alpha_pattern': {},
      'use_dora': use_dora,
      'lora_bias': False,
      'revision': None,
  }
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # PEFT (through transformers) refuses safetensors files whose metadata names no format.
  safetensors.numpy.save_file(tensors, out / ADAPTER_WEIGHTS_NAME, metadata={'format': 'pt'})
  (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  return out


# Loading
# ------------------------------------------------------------------------------


def _read_adapter_config(directory: pathlib.Path) -> dict[str, Any]:
  config_path = directory / ADAPTER_CONFIG_NAME
  try:
    config = json.loads(config_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise FtjaxError(f'cannot read {config_path}: {e}') from e
  if not isinstance(config, dict):
    raise FtjaxError(f'{config_path} is not a JSON object: pass a PEFT adapter directory')
  peft_type = config.get('peft_type')
  if peft_type != 'LORA':
    raise FtjaxError(
        f'{config_path} has peft_type {peft_type!r}, and ftjax loads only LoRA adapters '
        "(peft_type 'LORA'): pass a LoRA adapter directory"
    )
  for field, is_set in _UNSUPPORTED_FIELDS.items():
    if is_set(config.get(field)):
      raise FtjaxError(
          f'{config_path} sets {field}={config[field]!r}, which ftjax does not support: use an '
          f'adapter saved without {field}'
      )
  for field in ('r', 'lora_alpha', 'target_modules'):
    if config.get(field) is None:
      raise FtjaxError(f'{config_path} lacks {field!r}: pass a complete PEFT LoRA adapter')
  if config.get('lora_dropout'):
    # Dropout only acts in training; ftjax's LoRA has none (see lora.apply_lora).
    logger.info('ignoring lora_dropout=%s of %s', config['lora_dropout'], config_path)
  return config


def _read_shapes(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
  with safetensors.safe_open(path, framework='numpy') as f:
    return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def _read_tensors(path: pathlib.Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
  tensors = {}
  with safetensors.safe_open(path, framework='numpy') as f:
    for key in keys:
      if f.get_slice(key).get_dtype() == 'BF16':
        # numpy has no bfloat16, so safetensors' numpy reader refuses these tensors.
        tensors[key] = read_bf16(path, key)
      else:
        tensors[key] = f.get_tensor(key)
  return tensors


def _module_and_factor(key: str, hf_prefixes: tuple[str, ...]) -> tuple[str, str] | None:
  """'base_model.model.[bert.]X.lora_A.weight' -> ('X', 'lora_A'), or None for other keys."""
  if not key.startswith(_PEFT_PREFIX):
    return None
  name = key[len(_PEFT_PREFIX):]
  for prefix in hf_prefixes:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  for factor, suffix in _FACTOR_SUFFIXES.items():
    if name.endswith(suffix):
      return name[: -len(suffix)], factor
  return None


def load_lora_adapter(
    model: nnx.Module,
    adapter_dir: str | os.PathLike[str],
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
  """Reads a PEFT LoRA adapter directory into `model` as adapter `adapter_name`, in place.

  The config's r, lora_alpha, use_rslora and target_modules drive `lora.apply_lora` on the
  layers PEFT would adapt, and the factors come from adapter_model.safetensors. If the model
  already has an adapter of that name on exactly those layers with the same rank and scaling,
  its factors are overwritten instead. The adapter becomes the active one. Factors for layers
  this model dropped (e.g. the pooler of a `SequenceClassifier` with mean pooling) are skipped.

  Args:
    model: an encoder (e.g. from `hub.load_encoder`) or a model holding one at `.encoder`.
    adapter_dir: holds adapter_config.json and adapter_model.safetensors.
    adapter_name: the ftjax adapter to create or overwrite.
    rngs: only used by the surgery's initialisation, which the file then overwrites.

  Returns:
    The '/'-joined paths of the layers that received the adapter.

  Raises:
    FtjaxError: for a missing file, a non-LoRA or unsupported config, tensors whose shapes show
      another base model, keys that map to no module of this model, a file that lacks some
      factor, or an existing adapter `adapter_name` of another rank or on other layers.
  """
  directory = pathlib.Path(adapter_dir)
  missing = [n for n in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
             if not (directory / n).is_file()]
  if missing:
    hint = ' (it has adapter_model.bin: re-save it with safe_serialization=True)' if (
        directory / 'adapter_model.bin').is_file() else ''
    raise FtjaxError(
        f'adapter directory {directory} has no {" and no ".join(missing)}{hint}: pass a '
        'directory written by peft save_pretrained or ftjax save_lora_adapter'
    )
  config = _read_adapter_config(directory)
  rank, alpha = int(config['r']), float(config['lora_alpha'])
  use_rslora = bool(config.get('use_rslora', False))
  use_dora = bool(config.get('use_dora', False))
  factors = ('lora_A', 'lora_B', 'lora_magnitude') if use_dora else ('lora_A', 'lora_B')

  encoder, prefix = _encoder_of(model)
  family = models.get_family(encoder.config.model_type)
  modules = _linear_modules(encoder)
  linears = _present_linears(model)
  targeted = _peft_targets(config['target_modules'], list(modules), config.get('exclude_modules'))
  # Layers the family has but this model dropped (the pooler under mean pooling) are skipped.
  kept = {hf: f'{prefix}{modules[hf]}' for hf in targeted if f'{prefix}{modules[hf]}' in linears}
  if not kept:
    raise FtjaxError(
        f'target_modules {config["target_modules"]!r} of {directory / ADAPTER_CONFIG_NAME} select '
        f'no layer of this {type(encoder).__name__}: the adapter is for another architecture'
    )

  weights_path = directory / ADAPTER_WEIGHTS_NAME
  found: dict[tuple[str, str], str] = {}
  for key, shape in _read_shapes(weights_path).items():
    parsed = _module_and_factor(key, family.hf_prefixes)
    if parsed is None or parsed[0] not in targeted or parsed[1] not in factors:
      raise FtjaxError(
          f'adapter {directory} holds {key}, which maps to no LoRA layer of this '
          f'{type(encoder).__name__} (target_modules {config["target_modules"]!r}): the adapter '
          'was trained for a different base model'
      )
    hf, factor = parsed
    if hf not in kept:
      logger.info('skipping %s: this model has no %s layer', key, hf)
      continue
    in_features, out_features = linears[kept[hf]].kernel.shape
    expected = {'lora_A': (rank, in_features), 'lora_B': (out_features, rank),
                'lora_magnitude': (out_features,)}[factor]
    if shape != expected:
      raise FtjaxError(
          f'adapter {directory} was trained for a different base model: {key} has shape '
          f'{shape}, this model expects {expected} (r={rank})'
      )
    found[(hf, factor)] = key
  absent = [f'{hf}.{factor}' for hf in kept for factor in factors
            if (hf, factor) not in found]
  if absent:
    raise FtjaxError(
        f'adapter {directory} lacks {absent[0]} (and {len(absent) - 1} more) that its '
        'target_modules select: the file is incomplete; re-save it'
    )

  a_attr, b_attr = _factor_attrs(adapter_name)
  scaling = _scaling(rank, alpha, use_rslora)
  existing = {
      path: layer for path, layer in linears.items()
      if isinstance(layer, LoRALinear) and layer.has_adapter(adapter_name)
  }
  for path, layer in existing.items():
    layer_rank = getattr(layer, a_attr).shape[1]
    if layer_rank != rank:
      raise FtjaxError(
          f'this model already has a LoRA adapter {adapter_name!r} of rank {layer_rank} (at '
          f'{path}) and {directory} has rank {rank}: pass another adapter_name, or load it into '
          'a model without that adapter'
      )
  if existing:
    if set(existing) != set(kept.values()) or any(
        not math.isclose(dict(layer.adapters)[adapter_name], scaling, rel_tol=1e-6)
        for layer in existing.values()):
      raise FtjaxError(
          f'this model already has a LoRA adapter {adapter_name!r} on other layers or with '
          f'another alpha than {directory}: pass another adapter_name'
      )
    set_active_adapter(model, adapter_name)
  else:
    targets = '^(' + '|'.join(re.escape(path) for path in kept.values()) + ')$'
    apply_lora(
        model, targets=targets, rank=rank, alpha=alpha, use_rslora=use_rslora,
        use_dora=use_dora, rngs=rngs if rngs is not None else nnx.Rngs(0), name=adapter_name,
    )

  tensors = _read_tensors(weights_path, list(found.values()))
  linears = _present_linears(model)  # The surgery replaced the layers.
  attrs = {'lora_A': a_attr, 'lora_B': b_attr, 'lora_magnitude': magnitude_name(adapter_name)}
  for hf, path in kept.items():
    for factor in factors:
      variable = getattr(linears[path], attrs[factor])
      # Factors are stored [out, in] like torch weights; the magnitude is a plain vector.
      variable[...] = jnp.asarray(tensors[found[(hf, factor)]].T, dtype=variable.dtype)
  return list(kept.values())


# IA3
# ------------------------------------------------------------------------------
# PEFT stores one `ia3_l` per adapted layer: [out, 1] when the output is scaled, [1, in] when
# the input of a feed-forward layer is.

_IA3_SUFFIX = '.ia3_l'


def save_ia3_adapter(model: nnx.Module, out_dir: str | os.PathLike[str], *,
                     base_model_name_or_path: str) -> pathlib.Path:
  """Writes the encoder's IA3 vectors in PEFT's format (`PeftModel.from_pretrained` loads it).

  Raises:
    FtjaxError: if the encoder has no IA3 layers.
  """
  encoder, prefix = _encoder_of(model)
  present = _present_linears(model)
  tensors, targets, feedforward = {}, [], []
  for hf_name, path in _linear_modules(encoder).items():
    layer = present.get(prefix + path)
    if not isinstance(layer, ia3_lib.IA3Linear):
      continue
    vector = np.asarray(layer.ia3_l.get_value(), np.float32)
    targets.append(hf_name)
    if layer.feedforward:
      feedforward.append(hf_name)
    tensors[_PEFT_PREFIX + hf_name + _IA3_SUFFIX] = (
        vector[None, :] if layer.feedforward else vector[:, None])
  if not tensors:
    raise FtjaxError('this model has no IA3 layers in its encoder to save: apply IA3 first')
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, out / ADAPTER_WEIGHTS_NAME, metadata={'format': 'pt'})
  config = {
      'peft_type': 'IA3', 'task_type': 'FEATURE_EXTRACTION',
      'base_model_name_or_path': base_model_name_or_path, 'inference_mode': True,
      # Full module names: PEFT matches a list entry exactly or as the name's last part.
      'target_modules': targets, 'feedforward_modules': feedforward,
      'fan_in_fan_out': False, 'init_ia3_weights': True, 'modules_to_save': None,
  }
  (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + '\n')
  return out


def load_ia3_adapter(model: nnx.Module, adapter_dir: str | os.PathLike[str]) -> list[str]:
  """Applies a PEFT IA3 adapter to `model` and sets its vectors; returns the adapted paths.

  Raises:
    FtjaxError: for missing files, another PEFT type, unsupported fields, an adapter for a
      different base model, or keys that name no adapted layer.
  """
  directory = pathlib.Path(adapter_dir)
  config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
  for path in (config_path, weights_path):
    if not path.is_file():
      raise FtjaxError(f'{directory} is not a PEFT adapter: {path.name} is missing')
  config = json.loads(config_path.read_text())
  if config.get('peft_type') != 'IA3':
    raise FtjaxError(f"adapter {directory} is {config.get('peft_type')!r}, not IA3")
  for field in ('modules_to_save', 'fan_in_fan_out'):
    if config.get(field):
      raise FtjaxError(f'adapter {directory} sets {field}, which ftjax cannot load')
  encoder, prefix = _encoder_of(model)
  present = _present_linears(model)
  known = _linear_modules(encoder)
  # Layers the family knows but this model dropped (the pooler under mean pooling) are skipped.
  modules = {name: path for name, path in known.items() if prefix + path in present}
  targets = _peft_targets(config['target_modules'], list(modules))
  feedforward = _peft_targets(config.get('feedforward_modules') or [], targets)
  with safetensors.safe_open(weights_path, framework='numpy') as f:
    vectors = {k[len(_PEFT_PREFIX):-len(_IA3_SUFFIX)]: f.get_tensor(k) for k in f.keys()}
  for name in sorted(set(vectors) & (set(known) - set(modules))):
    logging.info('IA3 vector for %s skipped: this model has no such layer', name)
    del vectors[name]
  stray = sorted(set(vectors) - set(targets))
  if stray or not targets:
    raise FtjaxError(f'adapter {directory} has IA3 vectors for {stray[:1] or "no"} module(s) '
                     'that this model does not adapt: is it for another base model?')
  # Check every shape before the surgery, so a bad file leaves the model untouched.
  for name, vector in vectors.items():
    kernel = present[prefix + modules[name]].kernel.get_value()
    expected = (1, kernel.shape[0]) if name in feedforward else (kernel.shape[1], 1)
    if tuple(vector.shape) != expected:
      raise FtjaxError(f'adapter {directory} was trained for a different base model: '
                       f'{name}{_IA3_SUFFIX} has shape {tuple(vector.shape)}, this model '
                       f'expects {expected}')
  anchored = lambda names: '^(' + '|'.join(re.escape(prefix + modules[n]) for n in names) + ')$'
  paths = ia3_lib.apply_ia3(model, targets=anchored(targets),
                            feedforward=anchored(feedforward) if feedforward else '(?!)')
  layers = _present_linears(model)
  for name, vector in vectors.items():
    layers[prefix + modules[name]].ia3_l.set_value(jnp.asarray(vector.reshape(-1)))
  return paths
