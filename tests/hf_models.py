"""Tiny random transformers models for the parity tests (a helper module, not a test file).

Every parity test builds its reference from a config with random weights, never a
download. The Llama-layout builder is shared by the transformer, HF-folder, GGUF and LoRA
tests; pytest finds this module through ``pythonpath = ["tests"]`` in pyproject.toml.
"""

import torch
import transformers

# Small enough to run in milliseconds, with grouped-query attention (8 query heads, 2 kv).
LLAMA_SHAPE = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    rope_theta=500.0,
)

_LLAMA_LIKE = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def tiny_llama(kind: str = "llama", vocab_size: int = 97, n_layers: int = 2, **config):
    """A random ``<kind>ForCausalLM`` in float32 eval mode, ``config`` overriding the shape.

    HF initialises norm weights to 1 and biases to 0, which would hide a converter that
    drops them: both are randomised here.
    """
    config_cls, model_cls = _LLAMA_LIKE[kind]
    cfg = config_cls(
        **{**LLAMA_SHAPE, "vocab_size": vocab_size, "num_hidden_layers": n_layers, **config}
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model
