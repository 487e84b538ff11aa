import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.finetune import WithAdapter, apply_adapters, trainable_parameters
from lmlab.models import build_model, get_preset

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_heads=2)


def tiny_model(**overrides):
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 50, "d_model": 32, "n_layers": 2}
    return build_model({**spec, "n_heads": 4, "d_ff": 64, "max_seq_len": 32, **overrides}).eval()


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_fresh_adapters_are_the_identity(layout):
    model = tiny_model(**(LLAMA if layout == "llama" else {}))
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        before = model(ids)
        apply_adapters(model, bottleneck=8)
        after = model(ids)
    assert torch.equal(before, after)  # W_up = 0, b_up = 0: the adapter adds exact zeros
    for block in model.blocks:
        assert isinstance(block.attn.o_proj, WithAdapter)
        assert isinstance(block.mlp.down_proj, WithAdapter)


@pytest.mark.parametrize("train_norms", [True, False])
def test_what_trains_and_how_much(train_norms):
    model = tiny_model()  # GPT-2 layout: LayerNorms with weight and bias
    total = trainable_parameters(model)[1]
    apply_adapters(model, bottleneck=8, train_norms=train_norms)
    per_adapter = 2 * 32 * 8 + 32 + 8  # W_down, W_up, b_up, b_down
    adapters = 2 * 2 * per_adapter  # 2 blocks x (attention, MLP)
    norms = (2 * 2 + 1) * 2 * 32  # 2 per block + final, weight and bias each
    expected = adapters + (norms if train_norms else 0)
    assert trainable_parameters(model) == (
        expected,
        total + adapters,
        expected / (total + adapters),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or "norm" in n for n in trainable)


def test_adapters_train():
    model = tiny_model(init_std=0.2)
    apply_adapters(model, bottleneck=8, train_norms=False)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6] * 4] * 2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter." not in n)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="bottleneck=0"):
        apply_adapters(tiny_model(), bottleneck=0)
    with pytest.raises(ConfigError, match="activation='swish'.*gelu"):
        apply_adapters(tiny_model(), activation="swish")
    with pytest.raises(ConfigError, match="already applied"):
        apply_adapters(apply_adapters(tiny_model(), bottleneck=4), bottleneck=4)
