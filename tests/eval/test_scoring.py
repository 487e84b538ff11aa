import pytest
import torch

from hf_models import tiny_llama
from lmlab.api import LM
from lmlab.checkpoint.hf import from_transformers
from lmlab.data.tokenizers import ByteTokenizer, CharTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.scoring import encode_pair, score_continuations, score_token_pairs
from lmlab.models import build_model, get_preset

REQUESTS = [
    ("The cat sat on the ", "mat"),
    ("Q: 2+2=? A:", " 4"),
    ("", "Hello"),  # empty context: scored after one end-of-document token
    ("x", " a much longer continuation"),
]


class ByteWithEos(ByteTokenizer):
    def __init__(self):
        super().__init__()
        self.eos_id = 0


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = tiny_llama(vocab_size=256)
    return hf, LM(from_transformers(hf), ByteWithEos())


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Answer: ", "yes") == (tok.encode("Answer:"), tok.encode(" yes"))
    assert encode_pair(ByteWithEos(), "", "yes") == ([0], tok.encode("yes"))
    with pytest.raises(ConfigError, match="empty context needs a tokenizer with an end-of"):
        encode_pair(tok, "  ", "yes")


def test_continuation_logprobs_match_transformers(pair):
    """Sum of log-softmax at the continuation positions, computed directly with the
    transformers model. Tolerance 1e-4: float32 sums of a few dozen log-probs."""
    hf, lm = pair
    got = score_continuations(lm, REQUESTS, batch_size=3)
    for (context, continuation), score in zip(REQUESTS, got):
        ctx, cont = encode_pair(lm.tokenizer, context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = hf(ids).logits.log_softmax(-1)[0, :-1]  # (T-1, V) predicts ids[1:]
        at = logp[len(ctx) - 1 :]
        expected = at.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert score.n_tokens == len(cont)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.is_greedy == bool((at.argmax(-1) == torch.tensor(cont)).all())


def test_batching_and_order_do_not_change_scores(pair):
    _, lm = pair
    one = score_continuations(lm, REQUESTS, batch_size=1)
    many = score_continuations(lm, REQUESTS[::-1], batch_size=4)[::-1]
    for a, b in zip(one, many):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert (a.n_tokens, a.is_greedy) == (b.n_tokens, b.is_greedy)


def test_is_greedy_when_the_continuation_is_the_argmax(pair):
    _, lm = pair
    ids = torch.tensor([lm.tokenizer.encode("abc")])
    with torch.no_grad():
        best = int(lm.model(ids)[0, -1].argmax())
    runner_up = int(lm.model(ids)[0, -1].argsort()[-2])
    greedy, other = score_token_pairs(
        lm.model, [(ids[0].tolist(), [best]), (ids[0].tolist(), [runner_up])]
    )
    assert greedy.is_greedy and not other.is_greedy
    assert greedy.logprob > other.logprob


def test_long_requests_keep_the_end_and_bad_requests_are_errors():
    torch.manual_seed(0)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 3, "max_seq_len": 8, "n_layers": 1}
    lm = LM(build_model(spec), CharTokenizer("abc"))
    long = score_continuations(lm, [("abc" * 10, "ab")])[0]
    short = score_continuations(lm, [(("abc" * 10)[-7:], "ab")])[0]  # the last 8 + 1 tokens
    assert long.logprob == pytest.approx(short.logprob, abs=1e-6)
    with pytest.raises(ConfigError, match="does not fit the context window of 8"):
        score_continuations(lm, [("a", "abcabcabcabc")])
    with pytest.raises(ConfigError, match="request 0 has an empty continuation"):
        score_continuations(lm, [("a", "")])
