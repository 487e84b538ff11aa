"""Parameter and FLOP counts of lmlab.models.flops against the model itself and a
hand-worked example."""

import pytest

from lmlab.models.flops import (
    chinchilla_flops_per_token,
    count_parameters,
    kaplan_flops_per_token,
    training_flops_per_token,
)
from lmlab.models.recurrent import RecurrentConfig, RecurrentLM
from lmlab.models.transformer import Transformer, TransformerConfig

VARIANTS = [
    {},  # GPT-2 form: learned positions, LayerNorm with bias, tied embeddings
    {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "bias": False, "n_kv_heads": 2},
    {"bias": False, "qkv_bias": True, "tie_embeddings": False, "mlp": "gelu"},
    {"d_head": 4, "n_kv_heads": 1, "pos": "rope"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=range(len(VARIANTS)))
def test_counted_parameters_equal_the_models(variant):
    config = TransformerConfig(
        vocab_size=37, d_model=24, n_layers=3, n_heads=6, d_ff=40, max_seq_len=20, **variant
    )
    model = Transformer(config)
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    embedding = model.tok_emb.weight.numel()
    embedding += model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    embedding += 0 if config.tie_embeddings else model.lm_head.weight.numel()
    assert counts.embedding == embedding
    assert counts.non_embedding == sum(
        p.numel() for name, p in model.named_parameters() if name.startswith(("blocks", "norm"))
    )


def test_flops_per_token_of_a_hand_worked_example():
    """V 10, d 8, 2 layers, 2 heads of 4 (d_attn 8), d_ff 16, T 4, GPT-2 form (tied).

    Parameters: token table 10*8 = 80, positions 4*8 = 32: embedding 112.
    One block: two LayerNorms 2*(8+8) = 32; q, k, v, o weights 4*64 = 256 and biases
    4*8 = 32; MLP 8*16 + 16 + 16*8 + 8 = 280: 600. Two blocks 1200, final norm 16:
    non-embedding N = 1216, total 1328.
    Kaplan: 6*1216 + 6*2*4*8 = 7296 + 384 = 7680; with embeddings 6*1328 + 384 = 8352.
    Chinchilla, one sequence of T = 4: embeddings 2*4*10*8 = 640; per layer q, k, v
    2*4*8*(2+2*2)*4 = 1536, logits 2*4*4*8 = 256, softmax 3*2*4*4 = 96, weights @ values
    256, output 2*4*8*8 = 512, MLP 2*4*(2*8*16) = 2048: 4704; two layers 9408; logits
    640. Forward 640 + 9408 + 640 = 10688; training 3 * 10688 = 32064 per sequence,
    32064 / 4 = 8016 per token.
    """
    config = TransformerConfig(
        vocab_size=10, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=4
    )
    counts = count_parameters(config)
    assert (counts.total, counts.embedding, counts.non_embedding) == (1328, 112, 1216)
    assert kaplan_flops_per_token(config, seq_len=4) == 7680
    assert kaplan_flops_per_token(config, seq_len=4, embeddings=True) == 8352
    assert chinchilla_flops_per_token(config, seq_len=4) == 8016
    assert training_flops_per_token(Transformer(config), seq_len=4) == 8016


def test_only_fully_trained_decoders_are_counted():
    config = TransformerConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16)
    model = Transformer(config)
    model.tok_emb.weight.requires_grad_(False)  # frozen weights, as under LoRA
    assert training_flops_per_token(model, seq_len=4) is None
    lstm = RecurrentLM(RecurrentConfig(vocab_size=10, d_model=8, n_layers=1, cell="lstm"))
    assert training_flops_per_token(lstm, seq_len=4) is None
