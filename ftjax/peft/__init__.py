"""Parameter-efficient fine-tuning: each method is model surgery that adds trainable variables.

Every method takes a loaded model, modifies it in place (new variables; base weights untouched)
and names what it added with a regex over parameter paths. `apply(model, config.peft)` is the
one entry the trainer calls: it dispatches on `config.peft.method`, so the loop never names a
method, and the policy's 'peft' preset trains exactly the new variables plus the new head.
"""

from collections.abc import Callable

import ml_collections
from flax import nnx

from ftjax import models
from ftjax.errors import FtjaxError
from ftjax.peft import adapters, ia3, prompts
from ftjax.peft.lora import (
    DEFAULT_ADAPTER,
    LoRALinear,
    adapter_names,
    apply_lora,
    lora_filter,
    merge_lora,
    set_active_adapter,
    strip_lora,
    unmerge_lora,
)


def default_targets(model: nnx.Module, method: str) -> str:
  """The family's default module regex for `method` (e.g. LoRA on BERT's query and value)."""
  backbone = getattr(model, 'encoder', model)
  family = models.get_family(getattr(getattr(backbone, 'config', None), 'model_type', None))
  if method not in family.peft_targets:
    raise FtjaxError(f'{family.model_type} has no default {method} targets: set them in the '
                     'config (a regex over module paths)')
  return family.peft_targets[method]


def _targets(model: nnx.Module, given: str, method: str) -> str:
  """`given` if the config sets it, else the family's default for `method`."""
  return given or default_targets(model, method)


def _lora(model: nnx.Module, cfg: ml_collections.ConfigDict, seed: int) -> str:
  apply_lora(model, targets=_targets(model, cfg.targets, 'lora'), rank=cfg.rank,
             alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.rslora, use_dora=cfg.dora,
             rngs=nnx.Rngs(seed))
  return r'/lora_(a|b|magnitude)$'


def _prompt(model: nnx.Module, cfg: ml_collections.ConfigDict, seed: int) -> str:
  path = prompts.apply_prompt_tuning(model, num_virtual_tokens=cfg.num_virtual_tokens,
                                     init=cfg.init, rngs=nnx.Rngs(seed))
  return f'^{path}$'


def _prefix(model: nnx.Module, cfg: ml_collections.ConfigDict, seed: int) -> str:
  path = prompts.apply_prefix_tuning(model, num_virtual_tokens=cfg.num_virtual_tokens,
                                     rngs=nnx.Rngs(seed))
  return f'^{path}$'


def _ia3(model: nnx.Module, cfg: ml_collections.ConfigDict, seed: int) -> str:
  del seed  # IA3 starts at ones: nothing random.
  ia3.apply_ia3(model, targets=_targets(model, cfg.targets, 'ia3'),
                feedforward=_targets(model, cfg.feedforward, 'ia3_feedforward'))
  return r'/ia3_l$'


def _bottleneck(kind: str):
  def surgery(model: nnx.Module, cfg: ml_collections.ConfigDict, seed: int) -> str:
    adapters.apply_adapters(model, kind=kind, reduction_factor=cfg.reduction_factor,
                            non_linearity=cfg.non_linearity, rngs=nnx.Rngs(seed),
                            targets=_targets(model, cfg.get('targets', ''), kind))
    return r'/adapter_(down|up)/'
  return surgery


# method name -> (surgery(model, method config, seed) -> regex of the new trainable paths).
METHODS: dict[str, Callable[[nnx.Module, ml_collections.ConfigDict, int], str]] = {
    'lora': _lora,
    'prompt': _prompt,
    'prefix': _prefix,
    'ia3': _ia3,
    'houlsby': _bottleneck('houlsby'),
    'pfeiffer': _bottleneck('pfeiffer'),
}


def apply(model: nnx.Module, peft: ml_collections.ConfigDict, *, seed: int) -> str | None:
  """Applies `peft.method` to `model`; returns the regex of its trainable paths (None: no PEFT).

  Raises:
    FtjaxError: for an unknown method or a spec the method rejects.
  """
  if peft.method == 'none':
    return None
  if peft.method not in METHODS:
    raise FtjaxError(f'unknown peft.method {peft.method!r}; choose none or '
                     f'{", ".join(sorted(METHODS))}')
  # Houlsby and Pfeiffer adapters share one block of settings.
  settings = peft.adapters if peft.method in ('houlsby', 'pfeiffer') else peft[peft.method]
  return METHODS[peft.method](model, settings, seed)


__all__ = [
    'DEFAULT_ADAPTER',
    'LoRALinear',
    'METHODS',
    'adapter_names',
    'apply',
    'apply_lora',
    'lora_filter',
    'merge_lora',
    'set_active_adapter',
    'strip_lora',
    'unmerge_lora',
]
