"""The activation cache matches TransformerLens' on the same weights (issue 17).

TransformerLens 4 (installed: 4.3) removed ``HookedTransformer``; its own from-config
model is the TL-native model behind ``TransformerBridge`` (``boot_native``), which computes
the transformer in TransformerLens' code and exposes the HookedTransformer hook names.
We build it from a config, copy lmlab's random weights into it with ``load_state_dict``
(no weight processing: ``boot_native`` runs none, so no fold_ln, no centring, no
fold_value_biases, no refactored attention) and compare every cached activation.

Layout differences, undone in ``expected_lmlab``:
- TL's q, k, v are [B, T, H, Dh]; lmlab's are [B, H, T, Dh] (as the attention computes them).
- TL's ``hook_q``/``hook_k`` are before RoPE; lmlab's are after it. With rotary positions
  we rotate TL's q and k with TL's own rotary module before comparing.
- TL's rotary pairs adjacent dimensions (2i, 2i+1); lmlab pairs (i, i + Dh/2) as Hugging
  Face's Llama does. The same model in TL's layout has each head's q and k rows permuted
  (``PAIRS``), and its q and k come out permuted alike (q . k is unchanged).
- lmlab's ``hook_resid_final`` is after the final norm: TL's ``ln_final.hook_out``.

Tolerance: float32, 2e-5 absolute and relative -- the two models do the same operations in
different orders (lmlab's fast attention path vs TL's explicit softmax), so results differ
by float rounding (observed ~1e-6).
"""

import pytest
import torch

from lmlab.interp.hooks import run_with_cache
from lmlab.models import build_model, get_preset

V, T = 61, 12
TOL = dict(rtol=2e-5, atol=2e-5)
SHAPES = {
    # GPT-2 layout: learned positions, LayerNorm, gelu_tanh, biases, tied embeddings.
    "gpt2": {
        **get_preset("gpt2-124m"),
        "vocab_size": V,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 80,
        "max_seq_len": 16,
    },
    # Llama layout: RoPE, RMSNorm, SwiGLU, grouped-query attention (4 query, 2 kv heads).
    "llama": {**get_preset("llama-small"), "vocab_size": V, "d_model": 32, "n_layers": 2}
    | {"n_heads": 4, "n_kv_heads": 2, "d_ff": 48, "max_seq_len": 16, "rope_theta": 500.0},
}


def tl_config(c) -> dict:
    """TransformerLens' config for lmlab config ``c``."""
    cfg = dict(
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        d_head=c.head_size,
        n_ctx=c.max_seq_len,
        d_vocab=c.vocab_size,
        d_mlp=c.d_ff,
        eps=c.norm_eps,
        seed=0,
    )
    if c.pos == "rope":
        cfg |= dict(positional_embedding_type="rotary", rotary_base=c.rope_theta)
        cfg |= dict(n_key_value_heads=c.kv_heads)
    if c.mlp == "swiglu":
        cfg |= dict(act_fn="silu", gated_mlp=True)
    else:
        cfg |= dict(act_fn="gelu_new" if c.mlp == "gelu_tanh" else "gelu")
    cfg |= dict(normalization_type="RMS", final_rms=True) if c.norm == "rmsnorm" else {}
    cfg |= {} if c.norm == "rmsnorm" else dict(normalization_type="LN")
    return cfg


def pairs(head_size: int) -> torch.Tensor:
    """Dimension j of a head in TL's adjacent-pair RoPE layout is lmlab's ``pairs[j]``:
    [0, Dh/2, 1, Dh/2 + 1, ...]."""
    half = head_size // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()


def tl_state_dict(model) -> dict[str, torch.Tensor]:
    """lmlab weights under the TL-native model's names (and RoPE layout)."""
    c = model.config
    sd = model.state_dict()
    out = {"tok_embed.weight": sd["tok_emb.weight"], "head.weight": sd["lm_head.weight"]}
    if c.pos == "learned":
        out["pos.weight"] = sd["pos_emb.weight"]
    mlp = {"up_proj": "fc_in", "down_proj": "fc_out"}
    if c.mlp == "swiglu":
        mlp = {"gate_proj": "gate", "up_proj": "in", "down_proj": "out"}
    for i in range(c.n_layers):
        a, b = f"blocks.{i}.", f"layers.{i}."
        for ours, theirs in [("attn_norm", "ln1"), ("mlp_norm", "ln2")]:
            for kind in ("weight", "bias"):
                if a + f"{ours}.{kind}" in sd:
                    out[b + f"{theirs}.{kind}"] = sd[a + f"{ours}.{kind}"]
        for ours, theirs in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")]:
            w = sd[a + f"attn.{ours}_proj.weight"]
            bias = sd.get(a + f"attn.{ours}_proj.bias", torch.zeros(w.shape[0]))
            if c.pos == "rope" and ours in "qk":  # rows of each head into TL's pair order
                heads = w.shape[0] // c.head_size
                w = w.view(heads, c.head_size, -1)[:, pairs(c.head_size)].reshape(w.shape)
                bias = bias.view(heads, c.head_size)[:, pairs(c.head_size)].reshape(-1)
            out[b + f"attn.{theirs}.weight"], out[b + f"attn.{theirs}.bias"] = w, bias
        for ours, theirs in mlp.items():
            for kind in ("weight", "bias"):
                if a + f"mlp.{ours}.{kind}" in sd:
                    out[b + f"mlp.{theirs}.{kind}"] = sd[a + f"mlp.{ours}.{kind}"]
    for kind in ("weight", "bias"):
        if f"norm.{kind}" in sd:
            out[f"ln_out.{kind}"] = sd[f"norm.{kind}"]
    return out


def tl_bridge(model):
    """TransformerLens' model with lmlab's weights, no weight processing."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformer_lens.model_bridge.sources.native import NativeModel

    cfg = TransformerBridgeConfig.from_dict(tl_config(model.config))
    native = NativeModel(cfg)
    native.load_state_dict(tl_state_dict(model), strict=True)
    bridge = build_bridge_from_module(native, "TransformerLensNative", tl_config=cfg)
    return bridge.eval(), native


def expected_lmlab(name: str, tl_cache, native, c) -> torch.Tensor:
    """TL's activation ``name`` in lmlab's layout."""
    act = tl_cache[name]
    if name.endswith(("hook_q", "hook_k", "hook_v")):
        if c.pos == "rope" and not name.endswith("hook_v"):
            # TL hooks q and k before RoPE: rotate them with TL's own rotary tables
            q = act.transpose(1, 2)  # (B, H, T, Dh)
            rotated, _ = native.rotary.apply_rope(q, q)
            # back from TL's adjacent pairs to lmlab's halves
            inverse = torch.argsort(pairs(c.head_size))
            return rotated[..., inverse]
        return act.transpose(1, 2)  # (B, T, H, Dh) -> (B, H, T, Dh)
    return act  # hook_z is [B, T, H, Dh] in both; z = pattern @ v and v is not permuted


@pytest.mark.parametrize("shape", SHAPES)
def test_cache_matches_transformer_lens(shape):
    torch.manual_seed(0)
    model = build_model(SHAPES[shape]).eval()
    c = model.config
    # Random weights everywhere, norms and biases too, so a swapped tensor cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    bridge, native = tl_bridge(model)
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = run_with_cache(model, ids)
        tl_logits, tl_cache = bridge.run_with_cache(ids)

    names = ["hook_embed"] + (["hook_pos_embed"] if c.pos == "learned" else [])
    for i in range(c.n_layers):
        names += [f"blocks.{i}.{h}" for h in ("hook_resid_pre", "hook_resid_mid")]
        names += [f"blocks.{i}.{h}" for h in ("hook_attn_out", "hook_mlp_out", "hook_resid_post")]
        names += [f"blocks.{i}.attn.{h}" for h in ("hook_q", "hook_k", "hook_v")]
        names += [f"blocks.{i}.attn.{h}" for h in ("hook_pattern", "hook_z")]
    for name in names:
        want = expected_lmlab(name, tl_cache, native, c)
        torch.testing.assert_close(cache[name], want, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(cache["hook_resid_final"], tl_cache["ln_final.hook_out"], **TOL)
    torch.testing.assert_close(logits, tl_logits, **TOL)
    assert not torch.allclose(logits[0], logits[1])  # the inputs differ, so must the outputs
