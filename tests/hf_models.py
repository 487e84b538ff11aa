"""Tiny random transformers models and tokenizers for the parity tests (a helper module,
not a test file).

Every parity test builds its reference from a config with random weights, never a
download. The Llama-layout builder is shared by the transformer, HF-folder, GGUF and LoRA
tests; pytest finds this module through ``pythonpath = ["tests"]`` in pyproject.toml.
"""

import tokenizers
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


WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_wordpiece(words: list[str], padding: bool = False) -> tokenizers.Tokenizer:
    """A BERT-style WordPiece tokenizer over ``WORDPIECE_SPECIALS + words``: lowercasing,
    BERT's pre-tokenizer, ``[CLS] ... [SEP]``. ``padding`` turns on the padding and
    truncation many hub files carry (all-MiniLM-L6-v2 pads to 128), which must not leak."""
    vocab = {w: i for i, w in enumerate(WORDPIECE_SPECIALS + words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(WORDPIECE_SPECIALS)
    if padding:
        tok.enable_padding(length=12, pad_id=0, pad_token="[PAD]")
        tok.enable_truncation(max_length=12)
    return tok


def built_on_meta_only(monkeypatch, module):
    """Make ``module.build_model`` fail the test when it builds real tensors (shapes on the
    meta device are free), and reading tensor data fail too: what a check must precede."""
    real = module.build_model

    def guarded(spec, *args, **kwargs):
        assert torch.get_default_device().type == "meta", "the model was built before the check"
        return real(spec, *args, **kwargs)

    def no_read(*args, **kwargs):
        raise AssertionError("tensors were read before the config was checked")

    monkeypatch.setattr(module, "build_model", guarded)
    monkeypatch.setattr("lmlab.checkpoint.hf.read_hf_weights", no_read)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights in [0.5, 1.5], biases (BART's final_logits_bias too) N(0, 0.5): HF
    initialises them to 1 and 0, which would hide a converter that drops them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") and "relative_attention_bias" not in name:
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.normal_(0, 0.5)
    return model.eval()


def _untie(model: torch.nn.Module) -> None:
    """Give the model an lm_head of its own. transformers >= 5 ties T5's and BART's output
    to the embeddings whatever the config says, and leaves them untied on load when the
    file holds two different tensors: the layout of T5 v1.1 and mT5 checkpoints."""
    with torch.no_grad():
        weight = torch.randn_like(model.lm_head.weight) * model.config.d_model**-0.5
    model.lm_head.weight = torch.nn.Parameter(weight)


def tiny_t5(
    kind: str = "t5", vocab_size: int = 61, tied: bool = True, **config
) -> transformers.PreTrainedModel:
    """A random ``T5ForConditionalGeneration`` (``kind="mt5"``: ``MT5ForConditionalGeneration``)
    in float32 eval mode: 4 heads of d_kv 6 (so that n_heads * d_kv != d_model), 8 position
    buckets up to distance 20, so that sequences of a dozen tokens use the log-spaced
    buckets; ``config`` overrides (feed_forward_proj="gated-gelu" for v1.1)."""
    config_cls, model_cls = {
        "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
        "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
    }[kind]
    shape = dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=6,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
    )
    if not tied:  # T5 v1.1 and mT5 say so, and their output is not rescaled
        shape["tie_word_embeddings"] = False
    model = model_cls(config_cls(**{**shape, **config}))
    if not tied:
        _untie(model)
    return _randomise(model)


_BART_LIKE = {
    "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration, {}),
    # sinusoidal positions; Marian post-norm (the paper's layout), Pegasus pre-norm
    "marian": (
        transformers.MarianConfig,
        transformers.MarianMTModel,
        {"pad_token_id": 1, "decoder_start_token_id": 1, "eos_token_id": 0},  # start at pad
    ),
    "pegasus": (
        transformers.PegasusConfig,
        transformers.PegasusForConditionalGeneration,
        {"pad_token_id": 0},
    ),
}


def tiny_bart(
    kind: str = "bart", vocab_size: int = 61, tied: bool = True, **config
) -> transformers.PreTrainedModel:
    """A random ``BartForConditionalGeneration`` (or, by ``kind``, ``MarianMTModel`` or
    ``PegasusForConditionalGeneration``: the same tensor names) in float32 eval mode,
    init_std 0.3 so that float rounding cannot flip a greedy argmax; ``config`` overrides."""
    config_cls, model_cls, ids = _BART_LIKE[kind]
    shape = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=40,
        init_std=0.3,
        **ids,
    )
    model = model_cls(config_cls(**{**shape, **config}))
    if not tied:
        _untie(model)
    return _randomise(model)
