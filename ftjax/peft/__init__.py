"""Parameter-efficient fine-tuning: each method is model surgery that adds trainable variables.

Every method takes a loaded model and returns it modified in place (new trainable variables,
frozen base weights untouched), plus a filter that selects what it added.
"""

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

__all__ = [
    'DEFAULT_ADAPTER',
    'LoRALinear',
    'adapter_names',
    'apply_lora',
    'lora_filter',
    'merge_lora',
    'set_active_adapter',
    'strip_lora',
    'unmerge_lora',
]
