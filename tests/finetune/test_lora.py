import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from hf_models import tiny_llama
from lmlab.checkpoint.hf import from_transformers, to_hf
from lmlab.errors import CheckpointError, ConfigError
from lmlab.finetune import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    describe_trainable,
    disabled_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from lmlab.models import build_model, get_preset
from lmlab.quant import Int4Linear

# float32 on CPU. Logits: as tests/models/test_transformer.py, the same maths in a different
# order differs by a few ulps per layer; 1e-5 absolute on logits of size ~1 catches any real
# mismatch (a wrong scaling or a transposed A gives errors of order 0.1). Gradients are sums
# over B*T positions of products of such values: 1e-5 absolute, 1e-4 relative.
ATOL, RTOL = 1e-5, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


def tiny_model(**overrides):
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 50, "d_model": 32, "n_layers": 2}
    return build_model({**spec, "n_heads": 4, "d_ff": 64, "max_seq_len": 32, **overrides}).eval()


def test_lora_matches_peft():
    hf = tiny_llama()
    ours = from_transformers(hf)
    r, alpha = 4, 8
    # init_lora_weights=False makes B random too (peft's default zeros it), so the LoRA
    # path changes the logits and A gets a non-zero gradient.
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    reference = peft.get_peft_model(hf, cfg)
    apply_lora(ours, LoRAConfig(r=r, alpha=alpha, targets=("q_proj", "v_proj")))
    pairs = []  # (ours, peft's) LoRA parameters
    with torch.no_grad():
        for i, layer in enumerate(reference.base_model.model.model.layers):
            for proj in ("q_proj", "v_proj"):
                theirs = getattr(layer.self_attn, proj)
                mine = getattr(ours.blocks[i].attn, proj)
                mine.lora_A.copy_(theirs.lora_A["default"].weight)
                mine.lora_B.copy_(theirs.lora_B["default"].weight)
                pairs.append((mine.lora_A, theirs.lora_A["default"].weight))
                pairs.append((mine.lora_B, theirs.lora_B["default"].weight))
    assert trainable_parameters(ours)[:2] == reference.get_nb_trainable_parameters()

    ids = torch.randint(0, 97, (2, 24))
    targets = torch.randint(0, 97, (2, 24))
    expected = reference(input_ids=ids).logits
    got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    F.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(got.flatten(0, 1), targets.flatten()).backward()
    for mine, theirs in pairs:
        assert mine.grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, theirs.grad, atol=GRAD_ATOL, rtol=GRAD_RTOL)
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


def test_fresh_lora_leaves_outputs_unchanged():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, LoRAConfig(r=4, targets=("q_proj", "v_proj", "up_proj")))
        after = model(ids)
    assert torch.equal(before, after)  # B = 0: the update adds exact zeros
    layer = model.blocks[0].attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.abs().max() > 0
    assert not torch.any(layer.lora_B)


def lora_with_random_b(**overrides):
    model = tiny_model(**overrides)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_merged_equals_unmerged(layout):
    llama = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_heads=2)
    model = lora_with_random_b(**(llama if layout == "llama" else {}))
    ids = torch.randint(0, 50, (2, 16))
    weight = model.blocks[1].attn.q_proj.base.weight.clone()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        unmerge_lora(model)
        again = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # fp32 rounding
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.blocks[1].attn.q_proj.base.weight, weight)


def test_unload_gives_a_plain_model_with_the_merged_weights():
    model = lora_with_random_b()
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        expected = model(ids)
        unload_lora(model)
        got = model(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name in model.state_dict())
    to_hf(model)  # the original parameter names again


def test_merging_into_a_quantized_base_is_refused():
    q = torch.randint(0, 16, (32, 32), dtype=torch.uint8)
    base = Int4Linear(q, scale=torch.full((32, 1), 0.01), zero=torch.zeros(32, 1))
    layer = LoRALinear(base, r=2, alpha=4)
    assert layer.lora_A.dtype == torch.float32  # QLoRA: adapter in fp32 over 4-bit weights
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), base(x))
    layer(x).sum().backward()
    assert layer.lora_B.grad is not None
    model = torch.nn.Sequential(layer)
    with pytest.raises(ConfigError, match="cannot merge LoRA into its Int4Linear base"):
        merge_lora(model)
    assert not layer.merged
    # The 4-bit weight counts toward the total as 32 * 32 frozen parameters.
    assert trainable_parameters(model) == (2 * 32 * 2, 2 * 32 * 2 + 32 * 32, 128 / 1152)


def test_save_and_load_adapter_round_trip(tmp_path):
    model = lora_with_random_b()
    save_adapter(model, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(lora_state_dict(model))  # the adapter only, no base weight
    assert all(n.endswith(("lora_A", "lora_B")) for n in names)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["alpha"] == 8 and config["kind"] == "lora"

    fresh = tiny_model()
    fresh.load_state_dict(
        {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora" not in k}
    )
    load_adapter(fresh, tmp_path / "adapter")  # applies LoRA from the saved config first
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[name], tensor)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_load_adapter_with_a_mismatched_shape_names_the_tensor(tmp_path):
    save_adapter(lora_with_random_b(), tmp_path / "adapter")
    other = tiny_model()
    apply_lora(other, LoRAConfig(r=2, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.k_proj\.lora_A.*shape"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(tiny_model(), tmp_path / "nowhere")


def test_apply_lora_freezes_the_rest_and_counts():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, targets=("q_proj", "v_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.attn.{p}.lora_{m}"
        for i in range(2)
        for p in ("q_proj", "v_proj")
        for m in "AB"
    }
    # per layer and target: A [4, 32] + B [32, 4] = 256; 2 layers x 2 targets
    trainable_count, total, share = trainable_parameters(model)
    assert trainable_count == 2 * 2 * 256
    assert total == sum(p.numel() for p in tiny_model().parameters()) + 1024
    assert describe_trainable(model) == (
        f"trainable 1,024 of {total:,} parameters ({1024 / total:.2%})"
    )


def test_unknown_target_lists_the_linear_layers():
    with pytest.raises(ConfigError, match=r"'q_prj'.*did you mean 'q_proj'.*valid: .*down_proj"):
        apply_lora(tiny_model(), LoRAConfig(targets=("q_prj",)))
    with pytest.raises(ConfigError, match="already applied"):
        apply_lora(apply_lora(tiny_model(), LoRAConfig()), LoRAConfig())


@pytest.mark.parametrize(
    "field, value", [("r", 0), ("alpha", 0.0), ("dropout", 1.0), ("targets", ())]
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"LoRAConfig.{field}="):
        LoRAConfig(**{field: value})


def test_lora_trains_with_dropout():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, dropout=0.1))
    model.train()
    ids = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_disabled_lora_computes_the_base_model():
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 65, "n_layers": 1}
    base = build_model(spec).eval()
    ids = torch.randint(0, 65, (2, 9))
    expected = base(ids)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, alpha=8))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)  # a trained-looking update
    assert not torch.allclose(model(ids), expected)
    with disabled_lora(model):
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    assert not torch.allclose(model(ids), expected)  # back on after the block
    merge_lora(model)
    with pytest.raises(ConfigError, match="unmerge_lora"):
        with disabled_lora(model):
            pass
