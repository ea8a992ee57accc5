"""Model families, keyed by the Hugging Face `model_type` found in a checkpoint's config.json.

A family is one module under `ftjax/models/` that exposes `FAMILY`: its config dataclass, its NNX
encoder and the map between its parameters and the Hugging Face safetensors names. Adding a family
is one line in `_FAMILY_MODULES`; the loader (`ftjax.hub`) never names a family. Families are
imported on first use so that `import ftjax.models` stays cheap.
"""

from collections.abc import Callable
import dataclasses
import importlib
from typing import Any

import numpy as np

from ftjax.errors import FtjaxError

# A path into an NNX state, e.g. ('layers', 0, 'attention', 'query', 'kernel').
StatePath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class WeightMapping:
  """Where one Hugging Face tensor lives in the NNX model, and how its layout differs.

  Attributes:
    path: the NNX state path of the parameter.
    to_nnx: HF array -> NNX array (e.g. a transpose for torch's [out, in] Linear weights).
    to_hf: the inverse of `to_nnx`, used by export.
  """

  path: StatePath
  to_nnx: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def transpose(a: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] <-> NNX kernel [in, out] (contiguous, for safetensors)."""
  return np.ascontiguousarray(a.T)


def same(a: np.ndarray) -> np.ndarray:
  """A tensor whose layout is the same in both worlds (biases, norms, embeddings)."""
  return a


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything the loader needs to know about one model family.

  Attributes:
    model_type: the Hugging Face `model_type` this family reads.
    config_cls: a dataclass with `from_hf(dict)` and `to_hf() -> dict`.
    model_cls: the encoder, called as `model_cls(config, *, dtype=..., rngs=...)`.
    hf_key_map: config -> {HF tensor name: WeightMapping}, every tensor the family can hold.
    hf_prefixes: prefixes that task checkpoints put before the encoder's names (e.g. 'bert.' in
      a BertForSequenceClassification file); the loader strips them, and export writes the first
      one before the backbone's names when it writes a task model.
    kind: 'encoder' (bidirectional text), 'decoder' (causal text, with a KV cache) or 'vision'
      (pixels in); it decides which heads and tasks the family serves.
    architectures: ftjax head class name ('CausalLM', 'SequenceClassifier', ...; '' for the bare
      backbone) -> the `transformers` class an export of that model is written as. A head
      missing here cannot be exported as a whole model.
    head_names: ftjax head class name -> the HF module name of its output layer in that
      architecture ('classifier' for BERT and ViT, 'score' for Llama and GPT-2).
    peft_targets: the default module-path regex of each PEFT method for this family (as
      Hugging Face PEFT's defaults): 'lora', 'ia3', 'ia3_feedforward' (among the (IA)^3
      targets, the layers that scale their input), 'houlsby' and 'pfeiffer' (adapter placement).
  """

  model_type: str
  config_cls: type
  model_cls: type
  hf_key_map: Callable[[Any], dict[str, WeightMapping]]
  hf_prefixes: tuple[str, ...] = ()
  kind: str = 'encoder'
  architectures: dict[str, str] = dataclasses.field(default_factory=dict)
  head_names: dict[str, str] = dataclasses.field(default_factory=dict)
  peft_targets: dict[str, str] = dataclasses.field(default_factory=dict)


# model_type -> module defining `FAMILY` (a module may serve several model types).
_FAMILY_MODULES: dict[str, str] = {
    'bert': 'ftjax.models.bert',
    'roberta': 'ftjax.models.roberta',
    'llama': 'ftjax.models.llama',
    'mistral': 'ftjax.models.llama',
    'qwen2': 'ftjax.models.llama',
    'gpt2': 'ftjax.models.gpt2',
    'vit': 'ftjax.models.vit',
}


def supported_model_types() -> list[str]:
  """The `model_type` values ftjax can load, sorted."""
  return sorted(_FAMILY_MODULES)


def get_family(model_type: str | None) -> Family:
  """Returns the family that reads checkpoints of `model_type`.

  Raises:
    FtjaxError: if no family handles `model_type`.
  """
  module_name = _FAMILY_MODULES.get(model_type or '')
  if module_name is None:
    raise FtjaxError(
        f'unsupported model_type {model_type!r} in the checkpoint config.json: ftjax supports '
        f'{", ".join(supported_model_types())}; pick a checkpoint of one of those families'
    )
  module = importlib.import_module(module_name)
  families = getattr(module, 'FAMILIES', None)
  return families[model_type] if families else module.FAMILY
