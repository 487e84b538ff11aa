"""Parameter-efficient fine-tuning: small modules that wrap or adapt a frozen lmlab model.

- ``lora``: LoRA (and QLoRA over a quantized base), merge/unmerge, adapter-only save/load.
- ``adapters``: Houlsby bottleneck adapters after attention and MLP.
- ``prompts``: prompt tuning (soft prompt) and prefix tuning (per-layer key/value prefix).
- ``selective``: BitFit and named parameter subsets; trainable-parameter counts.

Every method freezes the base model and reports what trains through
``describe_trainable(model)``.
"""

from lmlab.finetune.adapters import Adapter, WithAdapter, apply_adapters
from lmlab.finetune.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    disabled_lora,
    load_adapter,
    lora_config,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from lmlab.finetune.peft import apply_peft, peft_spec  # importing it registers PEFT checkpoints
from lmlab.finetune.prompts import PrefixTuning, PromptTuning
from lmlab.finetune.selective import (
    apply_bitfit,
    apply_selective,
    describe_trainable,
    trainable_parameters,
)

__all__ = [
    "apply_peft",
    "peft_spec",
    "Adapter",
    "LoRAConfig",
    "LoRALinear",
    "PrefixTuning",
    "PromptTuning",
    "WithAdapter",
    "apply_adapters",
    "apply_bitfit",
    "apply_lora",
    "disabled_lora",
    "apply_selective",
    "describe_trainable",
    "load_adapter",
    "lora_config",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
