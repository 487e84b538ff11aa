import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from lmlab.checkpoint.hf import from_transformers
from lmlab.errors import DecodingError
from lmlab.generate import (
    SamplingParams,
    beam_search_steps,
    generate,
    generate_ids,
    generate_text,
    stream_ids,
    stream_text,
)
from lmlab.generate.search import _beam_search
from lmlab.models import build_model, get_preset

# ----------------------------------------------------------------------------- toy models
#
# Tiny models that speak lmlab's interface exactly, so that decoding is tested without
# depending on the transformer: their logits are exact (no float noise), so batched and
# single-prompt runs must agree token for token, sampled ones included.


class HashLM(nn.Module):
    """Logits depend on the whole (unpadded) prefix through a running hash: a model with
    long memory, where cached and recomputed decoding only agree if the prefix is right."""

    STATES = 97

    def __init__(self, vocab_size: int = 11, max_seq_len: int | None = None, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(3 * torch.randn(self.STATES, vocab_size, generator=g))
        self.config = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.calls: list[tuple[int, int]] = []  # (B, T) of every forward

    def run(self, ids, mask, state, count):
        out = []
        for t in range(ids.shape[1]):
            real = torch.ones_like(ids[:, t], dtype=torch.bool) if mask is None else mask[:, t]
            state = torch.where(real, (state * 31 + ids[:, t] + 1) % self.STATES, state)
            count = count + real.long()
            out.append(self.table[(state + 7 * count) % self.STATES])
        return torch.stack(out, 1), state, count  # (B, T, V)

    def forward(self, ids, mask=None):
        self.calls.append(tuple(ids.shape))
        zeros = torch.zeros(ids.shape[0], dtype=torch.long)
        return self.run(ids, mask, zeros, zeros)[0]


class HashCache:
    def __init__(self, batch_size):
        self.state = torch.zeros(batch_size, dtype=torch.long)
        self.count = torch.zeros(batch_size, dtype=torch.long)
        self.length = 0

    def reorder(self, index):
        self.state, self.count = self.state[index], self.count[index]


class CachedHashLM(HashLM):
    def new_cache(self, batch_size, max_len):
        return HashCache(batch_size)

    def forward(self, ids, mask=None, cache=None):
        if cache is None:
            return super().forward(ids, mask)
        self.calls.append(tuple(ids.shape))
        logits, cache.state, cache.count = self.run(ids, mask, cache.state, cache.count)
        cache.length += ids.shape[1]
        return logits


class TableLM(nn.Module):
    """A bigram model: the next-token logits are row ``last token`` of a fixed table."""

    def __init__(self, logits: torch.Tensor, max_seq_len: int | None = None):
        super().__init__()
        self.table = nn.Parameter(logits.clone())
        self.config = SimpleNamespace(vocab_size=logits.shape[1], max_seq_len=max_seq_len)

    def forward(self, ids, mask=None):
        return self.table[ids]  # (B, T, V)


def successor_lm(vocab_size: int = 10) -> TableLM:
    """Always continues with (last token + 1) mod V."""
    return TableLM(5 * torch.eye(vocab_size).roll(1, dims=1))


class CharTokenizer:
    """'a' <-> 0, 'b' <-> 1, ...; ``eos_id`` is an attribute, as the text helpers expect."""

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(i + ord("a")) for i in ids)


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is end-of-sequence. Decoding replaces broken UTF-8."""

    eos_id = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def naive_greedy(model, prompt, n, stop=()):
    """The textbook loop: run the whole sequence, append the argmax, repeat."""
    ids = list(prompt)
    for _ in range(n):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)
        if token in stop:
            break
    return ids[len(prompt) :]


def sequence_logprob(model, prompt, new):
    """log p(new | prompt) under the model."""
    ids = torch.tensor([list(prompt) + list(new)])
    logp = model(ids)[0, :-1].log_softmax(-1)
    picked = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]]
    return float(picked.sum().detach())


GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [3], [9, 8, 7, 6]]  # different lengths: left padding


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("cls", [HashLM, CachedHashLM])
def test_greedy_equals_the_textbook_loop(cls):
    model = cls()
    for prompt in PROMPTS:
        assert generate_ids(model, [prompt], GREEDY)[0] == naive_greedy(model, prompt, 12)


def test_temperature_zero_is_greedy():
    model = HashLM()
    greedy = generate_ids(model, PROMPTS, SamplingParams(do_sample=False, max_new_tokens=12))
    assert generate_ids(model, PROMPTS, GREEDY) == greedy
    # top-k and top-p never remove the most likely token: no effect on greedy decoding.
    filtered = SamplingParams(temperature=0, top_k=1, top_p=0.01, max_new_tokens=12)
    assert generate_ids(model, PROMPTS, filtered) == greedy


@pytest.mark.parametrize("cls", [HashLM, CachedHashLM])
def test_batched_greedy_equals_one_prompt_at_a_time(cls):
    model = cls()
    alone = [generate_ids(model, [p], GREEDY)[0] for p in PROMPTS]
    assert generate_ids(model, PROMPTS, GREEDY) == alone


def test_cached_model_reads_the_prompt_once_then_one_token_per_step():
    model = CachedHashLM()
    generate_ids(model, PROMPTS, GREEDY)
    assert model.calls == [(3, 7)] + [(3, 1)] * 11  # the 12th token is never fed back


def test_a_transformers_prompt_pass_computes_the_last_positions_logits_only():
    """A model taking ``logits_to_keep`` is asked for the last position's logits: the
    output layer sees one row per prompt, and the tokens are those of the full pass."""
    model = build_model({**get_preset("llama-small"), "vocab_size": 40, "n_layers": 2}).eval()
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    ids = generate_ids(model, PROMPTS, GREEDY)
    assert seen == [1] * 12
    for prompt, new in zip(PROMPTS, ids, strict=True):
        assert new == naive_greedy(model, prompt, 12)


def test_cached_decoding_equals_recomputation():
    cached, full = CachedHashLM(seed=3), HashLM(seed=3)
    for params in [GREEDY, SamplingParams(max_new_tokens=12, seed=5, top_k=4)]:
        assert generate_ids(cached, PROMPTS, params) == generate_ids(full, PROMPTS, params)


def test_eos_ends_a_row_and_other_rows_continue():
    model = successor_lm()
    params = SamplingParams(temperature=0, max_new_tokens=8, eos_id=6)
    out = generate(model, [[3], [0], [7]], params)
    assert out.ids == [[4, 5, 6], [1, 2, 3, 4, 5, 6], [8, 9, 0, 1, 2, 3, 4, 5]]
    assert out.finish_reasons == ["stop", "stop", "length"]


def test_stop_ids_end_a_row_like_eos():
    model = successor_lm()
    params = SamplingParams(temperature=0, max_new_tokens=8, stop_ids=(2, 8))
    assert generate_ids(model, [[3], [0], [9]], params) == [[4, 5, 6, 7, 8], [1, 2], [0, 1, 2]]


def test_repetition_penalty_steers_away_from_seen_tokens():
    table = 1.0 * torch.eye(6) + 0.5 * torch.eye(6).roll(1, dims=1)  # repeat (1.0) or +1 (0.5)
    model = TableLM(table)
    plain = SamplingParams(temperature=0, max_new_tokens=4)
    assert generate_ids(model, [[0]], plain) == [[0, 0, 0, 0]]
    penalised = SamplingParams(temperature=0, max_new_tokens=4, repetition_penalty=3.0)
    assert generate_ids(model, [[0]], penalised) == [[1, 2, 3, 4]]


def test_model_in_training_mode_decodes_in_eval_mode_and_stays_in_training():
    model = build_model({**tiny_spec(), "dropout": 0.5})
    expected = generate_ids(model.eval(), [[1, 2, 3]], GREEDY)
    model.train()
    assert generate_ids(model, [[1, 2, 3]], GREEDY) == expected
    assert model.training


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = CachedHashLM()
    runs = {
        seed: generate_ids(model, PROMPTS, SamplingParams(seed=seed, max_new_tokens=16))
        for seed in range(4)
    }
    assert runs[0] == generate_ids(model, PROMPTS, SamplingParams(seed=0, max_new_tokens=16))
    assert len({str(r) for r in runs.values()}) == 4


def test_sampling_uses_no_global_rng():
    model = HashLM()
    torch.manual_seed(1)
    a = generate_ids(model, PROMPTS, SamplingParams(seed=7, max_new_tokens=16))
    torch.manual_seed(2)
    state = torch.get_rng_state()
    assert generate_ids(model, PROMPTS, SamplingParams(seed=7, max_new_tokens=16)) == a
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not drawn from


def test_pure_sampling_follows_the_model_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    model = TableLM(probs.log().expand(4, 4))
    n = 4000
    out = generate_ids(model, [[0]] * n, SamplingParams(max_new_tokens=1, seed=0))
    freq = torch.bincount(torch.tensor(out).flatten(), minlength=4) / n
    # Binomial standard error is at most 0.008 for n = 4000: 4 sigma leaves no flaky runs.
    torch.testing.assert_close(freq, probs, atol=0.032, rtol=0)


def test_top_k_and_top_p_sampling_only_draw_kept_tokens():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    model = TableLM(probs.log().expand(5, 5))
    prompts = [[0]] * 500
    top2 = generate_ids(model, prompts, SamplingParams(max_new_tokens=3, top_k=2, seed=0))
    assert {t for row in top2 for t in row} == {1, 3}
    nucleus = generate_ids(model, prompts, SamplingParams(max_new_tokens=3, top_p=0.8, seed=0))
    assert {t for row in nucleus for t in row} == {1, 3, 4}  # 0.4 + 0.3 < 0.8 <= + 0.15


def test_low_temperature_sampling_approaches_greedy():
    model = HashLM()
    cold = SamplingParams(max_new_tokens=12, temperature=1e-4, seed=0)
    assert generate_ids(model, PROMPTS, cold) == generate_ids(model, PROMPTS, GREEDY)


# ----------------------------------------------------------------------------- beam search


def test_beam_search_with_one_beam_is_greedy():
    # generate() sends num_beams=1 to the greedy loop, so call the beam search itself.
    for model in [HashLM(), CachedHashLM(seed=1), successor_lm()]:
        for stop in [[], [6]]:
            params = SamplingParams(temperature=0, max_new_tokens=10, stop_ids=tuple(stop))
            ids, reasons = _beam_search(model, PROMPTS, params, stop)
            greedy = generate(model, PROMPTS, params)
            assert ids == greedy.ids and reasons == greedy.finish_reasons


def myopic_model() -> TableLM:
    """From token 0, 'a' (1) looks best (0.6 vs 0.4) but every continuation of it is unlikely
    (at most 0.35), while 'b' (2) is followed by eos (3) with probability 0.9."""
    p = torch.full((4, 4), 1e-3)
    p[0] = torch.tensor([1e-3, 0.6, 0.4, 1e-3])
    p[1] = torch.tensor([0.35, 0.3, 0.05, 0.3])
    p[2] = torch.tensor([0.05, 0.025, 0.025, 0.9])
    p[3] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    return TableLM((p / p.sum(1, keepdim=True)).log())


def test_beam_search_beats_myopic_greedy():
    model = myopic_model()
    greedy = generate_ids(model, [[0]], SamplingParams(temperature=0, max_new_tokens=2, eos_id=3))
    beam = generate_ids(model, [[0]], SamplingParams(num_beams=2, max_new_tokens=2, eos_id=3))
    assert greedy == [[1, 0]]
    assert beam == [[2, 3]]
    assert sequence_logprob(model, [0], beam[0]) > sequence_logprob(model, [0], greedy[0])


def test_beam_search_handles_a_batch_of_prompts():
    model = CachedHashLM()
    params = SamplingParams(num_beams=3, max_new_tokens=6)
    alone = [generate_ids(model, [p], params)[0] for p in PROMPTS]
    assert generate_ids(model, PROMPTS, params) == alone
    assert generate_ids(HashLM(), PROMPTS, params) == alone  # recomputation, same beams


def test_beam_search_finds_the_most_likely_sequence_of_a_short_search():
    # With enough beams to cover every sequence of length 3, beam search is exhaustive.
    model = HashLM(vocab_size=4)
    params = SamplingParams(num_beams=16, max_new_tokens=3, length_penalty=0.0)
    best = generate_ids(model, [[1, 2]], params)[0]
    everything = [[a, b, c] for a in range(4) for b in range(4) for c in range(4)]
    scores = {tuple(s): sequence_logprob(model, [1, 2], s) for s in everything}
    assert tuple(best) == max(scores, key=scores.get)


def chain_model() -> TableLM:
    """0 -> eos (0.3) or 1 (0.7); 1 -> eos (0.3) or 2 (0.7); 2 -> eos (0.9) or 3 (0.1)."""
    p = torch.full((5, 5), 1e-4)
    p[0, 4], p[0, 1] = 0.3, 0.7
    p[1, 4], p[1, 2] = 0.3, 0.7
    p[2, 4], p[2, 3] = 0.9, 0.1
    p[3], p[4] = 0.2, 0.2
    return TableLM((p / p.sum(1, keepdim=True)).log())


def test_length_penalty_trades_length_for_probability():
    # From 0: eos at once (log 0.3 = -1.20), or [1, 2, 4] (log 0.441 = -0.82 over 3 tokens).
    model = chain_model()

    def beam(lp):
        params = SamplingParams(num_beams=2, max_new_tokens=4, eos_id=4, length_penalty=lp)
        return generate_ids(model, [[0]], params)[0]

    assert beam(-2.0) == [4]  # favours short: -1.20 * 1 vs -0.82 * 9
    assert beam(0.0) == [1, 2, 4]  # raw log-probabilities
    assert beam(2.0) == [1, 2, 4]


def test_beam_early_stopping_semantics():
    # After two steps [4] (log 0.3 / 1 = -1.20) and [1, 4] (log 0.21 / 2 = -0.78) have
    # finished: num_beams of them. early_stopping=True stops there. False goes on, since the
    # running beam [1, 2] scores log 0.49 / 2 = -0.36 > -1.20, and finds [1, 2, 4]
    # (log 0.441 / 3 = -0.27), after which [1, 2, 3] (log 0.049 / 3 = -1.0) cannot compete.
    model = chain_model()
    params = dict(num_beams=2, max_new_tokens=6, eos_id=4)
    early = generate(model, [[0]], SamplingParams(early_stopping=True, **params))
    assert early.ids == [[1, 4]] and early.finish_reasons == ["stop"]
    late = generate(model, [[0]], SamplingParams(early_stopping=False, **params))
    assert late.ids == [[1, 2, 4]]


def test_beam_search_steps_show_each_steps_beams_and_hypotheses():
    # The early-stopping search above, step by step. Step 1: [1] runs (log 0.7), [4]
    # finishes (log 0.3). Step 2: [1, 2] runs (log 0.49), [1, 4] finishes (log 0.21 / 2):
    # two hypotheses, so the search closes.
    params = SamplingParams(num_beams=2, max_new_tokens=6, eos_id=4, early_stopping=True)
    steps, best = beam_search_steps(chain_model(), [0], params)
    assert best == [1, 4] and [s.step for s in steps] == [1, 2]
    assert steps[0].beams[0][0] == [1] and steps[0].beams[0][1] == pytest.approx(
        math.log(0.7), abs=1e-3
    )
    assert [ids for ids, _ in steps[0].finished] == [[4]] and not steps[0].closed
    assert steps[1].beams[0][0] == [1, 2]
    assert [ids for ids, _ in steps[1].finished] == [[1, 4], [4]] and steps[1].closed
    assert steps[1].finished[0][1] == pytest.approx(math.log(0.21) / 2, abs=1e-3)


@pytest.mark.parametrize("lp,early", [(1.0, False), (0.0, True), (-1.0, False)])
def test_beam_search_steps_end_where_generate_does(lp, early):
    model = CachedHashLM()
    for prompt in PROMPTS:
        params = SamplingParams(
            num_beams=3, max_new_tokens=5, eos_id=2, length_penalty=lp, early_stopping=early
        )
        steps, best = beam_search_steps(model, prompt, params)
        assert best == generate_ids(model, [prompt], params)[0]
        assert best == steps[-1].finished[0][0] and steps[-1].closed


def test_beam_search_with_stop_strings_cuts_the_text():
    tok = CharTokenizer()
    params = SamplingParams(num_beams=2, max_new_tokens=6, stop=("de",))
    out = generate(successor_lm(), ["a"], params, tokenizer=tok)
    assert out.texts == ["bc"] and out.finish_reasons == ["stop"]


# ----------------------------------------------------------------------------- text, stop strings, streaming


def test_stop_string_cuts_the_text_and_ends_generation():
    tok = CharTokenizer()
    params = SamplingParams(temperature=0, max_new_tokens=9, stop=("de", "xyz"))
    out = generate(successor_lm(), ["a", "f"], params, tokenizer=tok)
    assert out.texts == ["bc", "ghijabc"]
    assert out.ids[0] == [1, 2, 3, 4]  # stopped right after "e" completed "de"
    assert out.finish_reasons == ["stop", "stop"]  # row 1 found "de" at its 9th token


def test_generate_text_single_and_batch():
    tok = CharTokenizer(eos_id=5)
    model = successor_lm()
    params = SamplingParams(temperature=0, max_new_tokens=8)
    assert generate_text(model, tok, "a", params) == "bcde"  # eos (f) itself is not text
    assert generate_text(model, tok, ["a", "g"], params) == ["bcde", "hijabcde"]
    # An explicit eos_id overrides the tokenizer's.
    params = SamplingParams(temperature=0, max_new_tokens=8, eos_id=2)
    assert generate_text(model, tok, "a", params) == "b"


def test_stream_ids_equals_generate_ids():
    model = CachedHashLM()
    for params in [GREEDY, SamplingParams(seed=3, max_new_tokens=20, eos_id=4)]:
        stream = stream_ids(model, PROMPTS[0], params)
        assert stream.finish_reason is None
        pieces = list(stream)
        assert pieces == stream.ids == generate_ids(model, PROMPTS[:1], params)[0]
        assert stream.finish_reason == generate(model, PROMPTS[:1], params).finish_reasons[0]


def byte_model() -> TableLM:
    """Samples among a few characters, some of them multi-byte in UTF-8, and eos."""
    tokens = list(b"ab \n") + list("é€".encode()) + [256]
    table = torch.full((257, 257), -30.0)
    table[:, tokens] = 0.0
    table[:, 256] = -5.0  # eos now and then
    return TableLM(table)


def test_streamed_text_joined_equals_generate_text():
    model, tok = byte_model(), ByteTokenizer()
    stopped = pieces_before_end = 0
    for seed in range(30):
        params = SamplingParams(seed=seed, max_new_tokens=40, stop=("\n\n", " é"))
        expected = generate_text(model, tok, "x", params)
        stream = stream_text(model, tok, "x", params)
        pieces = list(stream)
        assert "".join(pieces) == expected
        assert all(pieces)  # no empty pieces
        assert "\n\n" not in expected and " é" not in expected
        stopped += stream.finish_reason == "stop"
        pieces_before_end += len(pieces) > 1
    assert stopped > 5 and pieces_before_end > 20  # the cases the test is about did happen


def test_stream_text_holds_back_incomplete_characters_and_stop_prefixes():
    # A scripted model: position t always predicts script[t]; "€" is three bytes.
    euro = list("€".encode())
    script = [ord("a"), *euro, ord("\n"), ord("b"), ord("\n"), ord("\n"), ord("c")]

    class Scripted(nn.Module):
        config = SimpleNamespace(vocab_size=257, max_seq_len=None)

        def forward(self, ids, mask=None):
            T = ids.shape[1]
            logits = torch.full((ids.shape[0], T, 257), -30.0)
            for t in range(T):
                logits[:, t, script[t] if t < len(script) else 256] = 0.0
            return logits

    params = SamplingParams(temperature=0, max_new_tokens=20, stop=("\n\n",))
    pieces = list(stream_text(Scripted(), ByteTokenizer(), "x", params))
    assert "".join(pieces) == "a€\nb" == generate_text(Scripted(), ByteTokenizer(), "x", params)
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[0] == "a" and "€" in pieces[1]  # emitted as soon as it is complete


def test_stream_rejects_beam_search_and_bad_input_at_call_time():
    model = successor_lm()
    with pytest.raises(DecodingError, match="num_beams=2"):
        stream_ids(model, [1], SamplingParams(num_beams=2))
    with pytest.raises(DecodingError, match="prompt has token id 10"):
        stream_text(model, CharTokenizer(), "ak", SamplingParams())


# ----------------------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "prompts,params,message",
    [
        ([[1, 11]], SamplingParams(), "prompt has token id 11 at position 1; valid ids are 0..10"),
        ([[1], [-1]], SamplingParams(), "prompt 1 has token id -1 at position 0"),
        ([[1], [2.0]], SamplingParams(), "prompt 1 has 2.0 (float)"),
        ([[1]], SamplingParams(stop_ids=(3, 11)), "stop_ids has token id 11"),
        ([[1]], SamplingParams(eos_id=99), "eos_id has token id 99"),
        ([[1], []], SamplingParams(), "prompt 1 is empty"),
        ([1, 2, 3], SamplingParams(), "wrapped in a list"),
        ([], SamplingParams(), "non-empty list"),
        (["abc"], SamplingParams(), "pass a tokenizer"),
        ([[1]], SamplingParams(stop=("x",)), "needs a tokenizer"),
        ([[1]], {"temperature": 0}, "params must be a SamplingParams"),
    ],
)
def test_invalid_input_is_rejected_before_the_model_runs(prompts, params, message):
    model = HashLM()
    with pytest.raises(DecodingError) as err:
        generate(model, prompts, params)
    assert message in str(err.value)
    assert model.calls == []


# ----------------------------------------------------------------------------- the transformer


def tiny_spec(**overrides):
    base = {**get_preset("gpt-char-tiny"), "vocab_size": 50, "d_model": 32, "n_layers": 2}
    return {**base, "n_heads": 2, "d_ff": 64, "max_seq_len": 64, **overrides}


class NoCache(nn.Module):
    """The same model with its cache hidden: decoding must recompute the prefix."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, ids, mask=None):
        return self.model(ids, mask=mask)


def peaky(spec):
    """A random transformer with large weights: its logits have clear winners, so float
    noise between two correct computations (~1e-6) cannot flip an argmax."""
    model = build_model(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


VARIANTS = {
    "gpt2": {},
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=1),
}
T_PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformer_cached_decoding_equals_recomputation(variant):
    model = peaky(tiny_spec(**variant))
    for params in [
        SamplingParams(temperature=0, max_new_tokens=16),
        SamplingParams(max_new_tokens=16, seed=0, top_p=0.9),
        SamplingParams(max_new_tokens=8, num_beams=3),
    ]:
        assert generate_ids(model, T_PROMPTS, params) == generate_ids(
            NoCache(model), T_PROMPTS, params
        )


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformer_batched_greedy_equals_one_prompt_at_a_time(variant):
    model = peaky(tiny_spec(**variant))
    params = SamplingParams(temperature=0, max_new_tokens=16, eos_id=3)
    alone = [generate_ids(model, [p], params)[0] for p in T_PROMPTS]
    assert generate_ids(model, T_PROMPTS, params) == alone
    assert alone == [naive_greedy(model, p, 16, stop=(3,)) for p in T_PROMPTS]


# Parity with transformers compares token ids exactly. The two implementations compute the
# same logits up to float32 rounding (~1e-6); initializer_range=0.3 (vs 0.02) makes the
# random models' logits peaky, so that rounding cannot flip an argmax or a beam ranking.


def hf_gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=97,
        n_embd=48,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_generate(hf, prompts, **kwargs):
    """transformers' generate on left-padded prompts; the new tokens of each, cut after eos."""
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    eos = kwargs.get("eos_token_id")
    out = hf.generate(ids, attention_mask=mask, pad_token_id=0, **kwargs)[:, T:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


HF_MODELS = {"gpt2": hf_gpt2, "llama": hf_llama}


@pytest.mark.parametrize("make", HF_MODELS.values(), ids=HF_MODELS.keys())
def test_greedy_matches_transformers_generate(make):
    hf = make()
    ours = from_transformers(hf)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    hf_greedy = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    alone = [hf_generate(hf, [p], **hf_greedy)[0] for p in prompts]
    assert generate_ids(ours, prompts[:1], params) == alone[:1]
    # A left-padded batch of two, as transformers does it with attention_mask + pad_token_id.
    batch = hf_generate(hf, prompts, **hf_greedy)
    assert batch == alone
    assert generate_ids(ours, prompts, params) == batch


@pytest.mark.parametrize("make", HF_MODELS.values(), ids=HF_MODELS.keys())
def test_greedy_with_eos_matches_transformers_generate(make):
    hf = make()
    ours = from_transformers(hf)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41]]
    first = generate_ids(ours, prompts, SamplingParams(temperature=0, max_new_tokens=20))
    eos = first[0][3]  # a token greedy decoding is known to produce
    params = SamplingParams(temperature=0, max_new_tokens=20, eos_id=eos)
    expected = hf_generate(hf, prompts, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    assert generate_ids(ours, prompts, params) == expected


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping",
    [(3, 1.0, False), (4, 2.0, False), (2, -1.0, True), (3, 0.0, True)],
)
def test_beam_search_matches_transformers_generate(num_beams, length_penalty, early_stopping):
    hf = hf_gpt2()
    ours = from_transformers(hf)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    greedy = generate_ids(ours, prompts, SamplingParams(temperature=0, max_new_tokens=12))
    eos = greedy[0][2]  # likely to be hit by some beams, so that hypotheses finish early
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    params = SamplingParams(max_new_tokens=12, eos_id=eos, **kwargs)
    expected = hf_generate(
        hf, prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos, **kwargs
    )
    assert generate_ids(ours, prompts, params) == expected


def test_transformer_sampling_is_seeded():
    model = build_model(tiny_spec()).eval()
    a = generate_ids(model, T_PROMPTS, SamplingParams(seed=1, max_new_tokens=10))
    assert generate_ids(model, T_PROMPTS, SamplingParams(seed=1, max_new_tokens=10)) == a
    assert generate_ids(model, T_PROMPTS, SamplingParams(seed=2, max_new_tokens=10)) != a


def test_transformer_streamed_text_equals_generate_text():
    model = build_model(tiny_spec(vocab_size=257)).eval()
    tok = ByteTokenizer()
    for seed in range(5):
        params = SamplingParams(seed=seed, max_new_tokens=24, stop=("a",))
        assert "".join(stream_text(model, tok, "hi", params)) == generate_text(
            model, tok, "hi", params
        )


def test_sequence_logprob_helper_is_right():
    # Guard for the helper the beam tests rely on: a bigram with known probabilities.
    model = myopic_model()
    assert math.isclose(sequence_logprob(model, [0], [2, 3]), math.log(0.4 * 0.9), rel_tol=1e-2)


# ----------------------------------------------------------------------------- kernels


class FlagSpy(CachedHashLM):
    """Records, per forward, how many tokens it got and whether oneDNN was on."""

    def __init__(self, dtype):
        super().__init__()
        self.table.data = self.table.data.to(dtype)
        self.proj = nn.Linear(2, 2, dtype=dtype)  # the switch looks at linear layers
        self.onednn: list[tuple[int, bool]] = []

    def forward(self, ids, mask=None, cache=None):
        self.onednn.append((ids.numel(), torch._C._get_mkldnn_enabled()))
        return super().forward(ids, mask, cache).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_one_token_steps_bypass_onednn_and_the_setting_is_restored(dtype):
    # bfloat16 batch-1 steps use torch's own matrix-vector kernel (twice as fast as
    # oneDNN's here, bench/decode.py); the prompt, batches and float32 keep oneDNN.
    model = FlagSpy(dtype)
    generate_ids(model, [[1, 2, 3]], GREEDY)
    assert model.onednn[0] == (3, True)
    assert all(on == (dtype != torch.bfloat16) for n, on in model.onednn[1:])
    model.onednn.clear()
    generate_ids(model, [[1, 2, 3], [4]], GREEDY)
    assert all(on for n, on in model.onednn)
    assert torch._C._get_mkldnn_enabled()


def test_onednn_setting_survives_a_failing_step():
    class Failing(FlagSpy):
        def forward(self, ids, mask=None, cache=None):
            if ids.numel() == 1:
                raise RuntimeError("boom")
            return super().forward(ids, mask, cache)

    with pytest.raises(RuntimeError, match="boom"):
        generate_ids(Failing(torch.bfloat16), [[1, 2, 3]], GREEDY)
    assert torch._C._get_mkldnn_enabled()


def test_bf16_gpt_decodes_like_float32():
    torch.manual_seed(0)
    model = build_model(tiny_spec()).eval()
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompt = [[1, 2, 3, 4]]
    want = generate_ids(model, prompt, params)
    got = generate_ids(model.to(torch.bfloat16), prompt, params)
    assert sum(a == b for a, b in zip(want[0], got[0])) >= 10


def test_one_token_steps_bypass_onednn_as_the_cpu_plan_says():
    from lmlab.devices import cpu_plan
    from lmlab.generate.search import _native_matvec
    from lmlab.quant import quantize_model

    bypass = not cpu_plan().onednn_matvec  # bf16 native and no AMX: torch's own kernel
    model = build_model(tiny_spec())
    assert not _native_matvec(model)  # float32: the same kernel either way
    assert _native_matvec(model.to(torch.bfloat16)) == bypass
    quantize_model(model, "int8")
    bf16_left = any(
        isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16 for m in model.modules()
    )
    assert _native_matvec(model) == (bypass and bf16_left)


# ----------------------------------------------------------------------------- context window


def test_prompt_longer_than_the_context_is_an_error_naming_the_lengths():
    model = HashLM(max_seq_len=8)
    with pytest.raises(DecodingError) as err:
        generate_ids(model, [[1, 2], list(range(1, 10))], SamplingParams(max_new_tokens=4))
    message = str(err.value)
    for part in ["prompt 1 has 9 tokens", "context of 8", "truncate_prompt=True"]:
        assert part in message, message
    assert model.calls == []


def test_truncation_keeps_the_end_of_the_prompt_and_is_marked():
    model = CachedHashLM(max_seq_len=8)
    params = SamplingParams(max_new_tokens=4, temperature=0, truncate_prompt=True)
    long = list(range(10))
    out = generate(model, [long, [7, 8]], params)
    assert out.truncated == [2, 0] and out.prompt_lengths == [8, 2]
    assert out.ids == generate_ids(model, [long[2:], [7, 8]], params)
    stream = stream_ids(model, long, params)
    assert stream.truncated == 2 and list(stream) == out.ids[0]


def naive_cropped_greedy(model, prompt, n):
    """nanoGPT's loop: crop the ids to the last max_seq_len, run the model, take the argmax."""
    ids, context = list(prompt), model.config.max_seq_len
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids[-context:]]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_hash_model_past_the_context_slides_the_window():
    # The hash model reads its whole input, so its output shows exactly what it was fed.
    for cls in [HashLM, CachedHashLM]:
        model = cls(max_seq_len=7)  # the longest prompt fills it
        params = SamplingParams(temperature=0, max_new_tokens=10)
        out = generate(model, PROMPTS, params)
        assert out.ids == [naive_cropped_greedy(model, p, 10) for p in PROMPTS]
        assert out.truncated == [0, 0, 0] and out.slid == [9, 3, 6]  # prompt + 9 fed - 7
        assert max(T for _, T in model.calls) <= 7


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformer_greedy_past_the_context_matches_cropping_the_ids(variant):
    model = peaky(tiny_spec(max_seq_len=16, **variant))
    params = SamplingParams(temperature=0, max_new_tokens=30)
    expected = [naive_cropped_greedy(model, p, 30) for p in T_PROMPTS]
    out = generate(model, T_PROMPTS, params)  # batched, left-padded, cached
    assert out.ids == expected
    assert out.slid == [8 + 30 - 1 - 16, 3 + 30 - 1 - 16, 5 + 30 - 1 - 16]
    assert [generate_ids(model, [p], params)[0] for p in T_PROMPTS] == expected
    assert generate_ids(NoCache(model), T_PROMPTS, params) == expected
    stream = stream_ids(model, T_PROMPTS[0], params)
    assert list(stream) == expected[0] and stream.slid == out.slid[0]


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_transformer_sampling_and_beam_search_past_the_context(variant):
    model = peaky(tiny_spec(max_seq_len=12, **variant))
    for params in [
        SamplingParams(max_new_tokens=20, seed=0, top_p=0.9),
        SamplingParams(max_new_tokens=14, num_beams=3),
    ]:
        out = generate(model, T_PROMPTS, params)
        assert all(len(row) == params.max_new_tokens for row in out.ids)
        assert out.slid == [len(p) + params.max_new_tokens - 1 - 12 for p in T_PROMPTS]
        assert generate_ids(NoCache(model), T_PROMPTS, params) == out.ids
        alone = [generate_ids(model, [p], params)[0] for p in T_PROMPTS]
        if params.num_beams > 1:  # (a sampled row depends on its batch)
            assert alone == out.ids


def test_transformer_prompt_longer_than_the_context_is_refused_or_truncated():
    model = build_model(tiny_spec(max_seq_len=16)).eval()
    with pytest.raises(DecodingError, match="has 20 tokens, more than the model's context of 16"):
        generate_ids(model, [list(range(20))], SamplingParams(max_new_tokens=8))
    params = SamplingParams(max_new_tokens=8, temperature=0, truncate_prompt=True)
    out = generate(model, [list(range(20))], params)
    assert out.truncated == [4] and len(out.ids[0]) == 8 and out.slid == [7]
    assert out.ids[0] == naive_cropped_greedy(model, list(range(4, 20)), 8)


def test_models_without_a_context_never_slide():
    model = CachedHashLM()  # max_seq_len None
    out = generate(model, PROMPTS, SamplingParams(temperature=0, max_new_tokens=40))
    assert out.slid == [0, 0, 0] and out.truncated == [0, 0, 0]
    assert out.ids[0] == naive_greedy(model, PROMPTS[0], 40)


# ----------------------------------------------------------------------------- non-finite logits


def nan_transformer():
    """A tiny transformer with one NaN weight: every logit it computes is NaN."""
    model = build_model(tiny_spec()).eval()
    with torch.no_grad():
        model.blocks[0].mlp.up_proj.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_new_tokens=4),
        SamplingParams(seed=0, max_new_tokens=4),
        SamplingParams(seed=0, max_new_tokens=4, top_k=5, top_p=0.9, repetition_penalty=1.2),
        SamplingParams(num_beams=3, max_new_tokens=4),
    ],
    ids=["greedy", "sampling", "filtered", "beam"],
)
def test_nan_weights_raise_a_decoding_error_naming_the_step(params):
    model = nan_transformer()
    message = "decoding step 1: the model's next-token logits for prompt 0 contain NaN"
    with pytest.raises(DecodingError, match=message):
        generate_ids(model, [[1, 2, 3]], params)
    if params.num_beams == 1:
        with pytest.raises(DecodingError, match=message):
            list(stream_ids(model, [1, 2, 3], params))


def test_non_finite_logits_name_the_step_and_the_prompt():
    table = 5 * torch.eye(10).roll(1, dims=1)  # successor model: 0 -> 1 -> 2 ...
    table[5, 2] = float("nan")
    model = TableLM(table)
    with pytest.raises(DecodingError, match="step 3: .* prompt 1 contain NaN"):
        generate_ids(model, [[0], [3]], SamplingParams(temperature=0, max_new_tokens=6))
    table[5] = float("-inf")
    with pytest.raises(DecodingError, match="step 3: .* prompt 1 logit -inf"):
        generate_ids(TableLM(table), [[0], [3]], SamplingParams(seed=0, max_new_tokens=6))
    table[5] = float("inf")
    with pytest.raises(DecodingError, match="step 3: .* prompt 0 contain inf"):
        generate_ids(TableLM(table), [[3]], SamplingParams(num_beams=2, max_new_tokens=6))


def test_logits_that_overflow_after_temperature_are_an_error_not_a_sample():
    model = TableLM(torch.tensor([[1e36, 0.0, -1e36]] * 3))
    with pytest.raises(DecodingError, match="step 1: no token of prompt 0 .* overflow"):
        generate_ids(model, [[0]], SamplingParams(temperature=1e-3, seed=0, max_new_tokens=2))
