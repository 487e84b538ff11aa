import doctest

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import ConfigError
from lmlab.train import ablations
from lmlab.train.ablations import (
    DepthConfig,
    PositionsConfig,
    compare_depth,
    compare_positions,
    depth_model,
    kth_token_rows,
    layer_grad_norms,
)


def test_docstring_examples():
    assert doctest.testmod(ablations).failed == 0


def test_kth_token_rows_answer_the_kth_data_token():
    rows = kth_token_rows(5, 200, torch.Generator().manual_seed(0))  # (200, 7)
    assert rows.shape == (200, 7)
    data, query, answer = rows[:, :5], rows[:, 5], rows[:, 6]
    assert data.max() < 5 and (query >= 5).all() and (query < 10).all()
    k = query - 5
    assert torch.equal(answer, data[torch.arange(200), k])
    assert len(set(k.tolist())) == 5  # every k is asked


def test_layer_grad_norms_match_autograd():
    torch.manual_seed(0)
    model = depth_model(ablations.VARIANTS["no layernorm"], DepthConfig(n_layers=3), 11)
    ids = torch.randint(0, 11, (2, 9))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    by_autograd = []
    for block in model.blocks:
        params = list(block.parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        by_autograd.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)).item())
    loss.backward()
    assert layer_grad_norms(model) == pytest.approx(by_autograd, rel=1e-5)


def test_compare_depth_records_the_gradient_at_init_and_trains():
    config = DepthConfig(n_layers=3, d_model=8, steps=4, batch_size=2, seq_len=6, record_every=2)
    ids = torch.randint(0, 7, (200,), generator=torch.Generator().manual_seed(1))
    report = compare_depth(config, ids, 7, progress=False)
    assert list(report["losses"]) == list(ablations.VARIANTS)
    for name, variant in ablations.VARIANTS.items():
        records = report["grad_norms"][name]
        assert [step for step, _ in records] == [0, 2, 4]
        assert len(report["losses"][name]) == 4
        # step 0 is the gradient of the untrained model on the first batch, recomputed here
        torch.manual_seed(config.seed)
        model = depth_model(variant, config, 7)
        batches = torch.Generator().manual_seed(config.seed)
        starts = torch.randint(0, 200 - 7, (2,), generator=batches)
        window = torch.stack([ids[s : s + 7] for s in starts.tolist()])
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        assert records[0][1] == pytest.approx(layer_grad_norms(model), rel=1e-5)
        assert report["losses"][name][0] == pytest.approx(loss.item(), rel=1e-5)


def test_compare_positions_small_run():
    config = PositionsConfig(steps=4, eval_every=2, eval_rows=30, d_model=16, n_tokens=4)
    report = compare_positions(config, progress=False)
    assert set(report["curves"]) == {"learned", "sinusoidal", "rope", "none"}
    assert [step for step, _, _ in report["curves"]["rope"]] == [2, 4]
    assert report["chance"] == 0.25
    assert torch.tensor(report["sinusoidal"]).shape == (5, 16)
    assert torch.tensor(report["learned"]).shape == (5, 16)
    for accuracy in report["final"].values():
        assert accuracy * 30 == pytest.approx(round(accuracy * 30))  # a share of 30 rows


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="kinds.*'alibi'.*learned, sinusoidal"):
        PositionsConfig(kinds=("alibi",))
    with pytest.raises(ConfigError, match="DepthConfig.n_layers=0"):
        DepthConfig(n_layers=0)
    with pytest.raises(ConfigError, match="more than 65"):
        compare_depth(DepthConfig(), torch.zeros(10, dtype=torch.long), 3, progress=False)
