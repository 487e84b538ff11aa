import pytest
import torch

from lmlab.align.heads import hidden_size, logits_and_hidden
from lmlab.errors import ConfigError
from lmlab.models import build_model, get_preset


def test_hidden_states_are_what_the_lm_head_reads():
    torch.manual_seed(0)
    model = build_model({**get_preset("gpt-char-tiny"), "vocab_size": 65, "n_layers": 1}).eval()
    ids = torch.randint(0, 65, (2, 7))
    logits, hidden = logits_and_hidden(model, ids)
    assert hidden.shape == (2, 7, hidden_size(model))
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=0)
    assert not model.lm_head._forward_pre_hooks  # the hook is removed


def test_family_without_lm_head_is_a_clear_error():
    with pytest.raises(ConfigError, match="lm_head"):
        hidden_size(torch.nn.Linear(3, 3))
