"""RoBERTa encoder (as `transformers.RobertaModel`): BERT's modules with RoBERTa's positions.

RoBERTa is BERT's architecture with two differences that matter here: position ids are derived
from the tokens (real tokens count up from `pad_token_id + 1`, padding tokens sit at
`pad_token_id`, whichever side the padding is on), and its checkpoints use a one-row token-type
table. The weights have BERT's names under a 'roberta.' prefix, so the BERT key map serves.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError
from ftjax.models import Family
from ftjax.models import bert
from ftjax.models import layers


@dataclasses.dataclass(frozen=True)
class RobertaConfig(bert.BertConfig):
  """A Hugging Face RoBERTa config.json; the defaults are those of roberta-base's."""

  model_type: ClassVar[str] = 'roberta'

  vocab_size: int = 50265
  max_position_embeddings: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1

  def __post_init__(self):
    super().__post_init__()
    if self.pad_token_id is None:
      raise FtjaxError('the RoBERTa config has no pad_token_id, which its position ids are '
                       'counted from: set it in config.json (1 in RoBERTa checkpoints)')

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that `transformers.RobertaModel.from_pretrained` reads."""
    return super().to_hf() | {'model_type': 'roberta', 'architectures': ['RobertaModel']}


def position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
  """RoBERTa's position ids: real tokens count from pad_token_id + 1, padding stays at pad."""
  real_BxL = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real_BxL, axis=1) * real_BxL + pad_token_id


class RobertaModel(bert.BertModel):
  """The RoBERTa encoder; `__call__` and `pool` as `BertModel`'s.

  Soft prompts and prefixes (prompt/prefix tuning) are refused: Hugging Face numbers RoBERTa
  positions differently when they are present, and ftjax does not reproduce that.
  """

  def position_ids(self, input_ids: jax.Array,
                   packing: layers.Packing | None = None) -> jax.Array:
    """RoBERTa's position ids of `input_ids`, [B, L], from the padding token (a packed batch's
    restart at each example's first token)."""
    if self.prompt is not None or self.prefix is not None:
      raise FtjaxError('prompt and prefix tuning are not supported for RoBERTa in ftjax: use '
                       'LoRA, IA3 or adapters, or a BERT checkpoint')
    config = self.config
    limit = config.max_position_embeddings - config.pad_token_id - 1
    if input_ids.shape[1] > limit:
      raise FtjaxError(f'sequence length {input_ids.shape[1]} exceeds the {limit} positions of '
                       'this RoBERTa model: lower the max length')
    if packing is not None:
      return jnp.where(packing.example_ids >= 0, packing.positions + config.pad_token_id + 1,
                       config.pad_token_id)
    return position_ids(input_ids, config.pad_token_id)


FAMILY = Family(
    model_type='roberta',
    config_cls=RobertaConfig,
    model_cls=RobertaModel,
    hf_key_map=bert.hf_key_map,
    hf_prefixes=('roberta.',),
    kind='encoder',
    peft_targets={'lora': r'attention/(query|value)$',
                  'ia3': r'attention/(key|value)$|/output$', 'ia3_feedforward': r'/output$',
                  'houlsby': r'attention/out$|/output$', 'pfeiffer': r'/output$'},
    architectures={'': 'RobertaModel', 'TokenClassifier': 'RobertaForTokenClassification'},
    head_names={'TokenClassifier': 'classifier'},
)
