"""Continuous batching (``lmlab.serve.engine``): jobs decoded together, joining and leaving
at any step, give exactly what ``lmlab.generate`` gives each prompt alone."""

import threading

import pytest
import torch

from lmlab.generate import SamplingParams, generate
from lmlab.lm import LM
from lmlab.models import build_model
from lmlab.serve.engine import Engine, Failed, Finished, Job, NewToken, PromptScores
from servers import PROMPTS, tiny_model


class Collector:
    """Events of several jobs; ``wait()`` until every job has finished or failed."""

    def __init__(self, n: int):
        self.ids = [[] for _ in range(n)]
        self.text = [""] * n
        self.end = [None] * n
        self.prompt = [None] * n
        self._left = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.started = [threading.Event() for _ in range(n)]

    def sink(self, i):
        def emit(event):
            if isinstance(event, NewToken):
                self.ids[i].append(event.score.id)
                self.text[i] += event.text
                if len(self.ids[i]) == 3:
                    self.started[i].set()
            elif isinstance(event, PromptScores):
                self.prompt[i] = event.tokens
            else:
                self.end[i] = event
                with self._lock:
                    self._left -= 1
                    if not self._left:
                        self._done.set()

        return emit

    def wait(self, timeout=60):
        assert self._done.wait(timeout), "the engine did not finish in time"


def job(lm, prompt, sink, max_tokens, **params):
    """A job ending at the tokenizer's eos, as lm.generate's decoding does."""
    eos = lm.tokenizer.eos_id
    params = SamplingParams(max_new_tokens=max(max_tokens, 1), eos_id=eos, **params)
    return Job(lm.tokenizer.encode(prompt), params, max_tokens, sink, stop_ids=(eos,))


def alone(lm, prompt, max_tokens, **decoding):
    """(text, finish reason, n new tokens) of lmlab.generate on the prompt by itself."""
    params = SamplingParams(max_new_tokens=max_tokens, **decoding)
    result = generate(lm.model, [prompt], params, lm.tokenizer)
    return result.texts[0], result.finish_reasons[0], len(result.ids[0])


def settings(i):
    """Greedy for even jobs, sampled with seed i for odd ones; lengths all different."""
    sampled = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": i}
    return 5 + 4 * i, {"temperature": 0.0} if i % 2 == 0 else sampled


def test_batched_jobs_equal_the_library_one_prompt_at_a_time(lm):
    """8 jobs at once (greedy and seeded sampling, prompts of 1 to 12 tokens, 5 to 33 new
    tokens): each equals lmlab.generate on its prompt alone, and steps held several rows."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=8)
    got = Collector(len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        max_tokens, decoding = settings(i)
        engine.submit(job(lm, prompt, got.sink(i), max_tokens, **decoding))
    got.wait()
    for i, prompt in enumerate(PROMPTS):
        max_tokens, decoding = settings(i)
        text, reason, n = alone(lm, prompt, max_tokens, **decoding)
        assert (got.text[i], got.end[i]) == (text, Finished(reason, n)), (i, prompt)
    assert engine.stats["max_rows"] == len(PROMPTS)
    assert engine.stats["steps"] < sum(settings(i)[0] for i in range(len(PROMPTS)))
    assert engine.active == 0
    engine.stop()


def test_jobs_joining_a_running_batch_with_longer_prompts_shift_it_exactly(lm):
    """A long-running job; others join after it has produced tokens, one with a prompt
    longer than every row so far (the rows move right), and the cache outgrows its first
    size (the rows move left and it grows): every output still equals the library's."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=4)
    prompts = ["h", "the lazy dog jumps over the quick brown fox and then the fox", "fox", "a b"]
    lengths = [120, 30, 60, 25]
    got = Collector(len(prompts))
    engine.submit(job(lm, prompts[0], got.sink(0), lengths[0], temperature=0))
    assert got.started[0].wait(30)
    for i in (1, 2):
        engine.submit(job(lm, prompts[i], got.sink(i), lengths[i], temperature=0))
    assert got.started[2].wait(30)
    engine.submit(job(lm, prompts[3], got.sink(3), lengths[3], temperature=0))
    got.wait()
    for i, prompt in enumerate(prompts):
        text, reason, n = alone(lm, prompt, lengths[i], temperature=0)
        assert (got.text[i], got.end[i]) == (text, Finished(reason, n)), i
    engine.stop()


def test_stop_tokens_and_stop_strings_end_a_job_as_in_the_library(lm):
    eos = lm.tokenizer.eos_id
    engine = Engine(lm.model, lm.tokenizer)
    prompts = ["the quick", "hello there", "fox"]
    cases = [
        {"stop": ("e",)},
        {"stop_ids": (lm.tokenizer.encode(" the")[0],), "stop": ("zz",)},
        {"stop": ("o", "x ")},
    ]
    got = Collector(len(prompts))
    for i, (prompt, case) in enumerate(zip(prompts, cases)):
        params = SamplingParams(max_new_tokens=40, temperature=0, eos_id=eos, **case)
        ids = tuple(dict.fromkeys([*params.stop_ids, eos]))
        engine.submit(Job(lm.tokenizer.encode(prompt), params, 40, got.sink(i), stop_ids=ids))
    got.wait()
    for i, (prompt, case) in enumerate(zip(prompts, cases)):
        alone = lm.generate(prompt, max_new_tokens=40, temperature=0, **case)
        assert got.text[i] == alone
        assert not any(s in got.text[i] for s in case["stop"])
    engine.stop()


def test_a_cancelled_job_leaves_at_the_next_step_and_frees_its_row(lm):
    engine = Engine(lm.model, lm.tokenizer, max_batch=2)
    got = Collector(3)
    jobs = [job(lm, p, got.sink(i), 150, temperature=0) for i, p in enumerate(PROMPTS[:3])]
    for j in jobs[:2]:
        engine.submit(j)
    assert got.started[0].wait(30)
    engine.submit(jobs[2])  # waits: both rows are taken
    engine.cancel(jobs[0])
    assert got.started[2].wait(30)  # the freed row took the waiting job
    n0 = len(got.ids[0])
    engine.cancel(jobs[1])
    engine.cancel(jobs[2])
    for _ in range(200):
        if engine.active == 0:
            break
        threading.Event().wait(0.05)
    assert engine.active == 0
    assert len(got.ids[0]) == n0 < 150  # nothing more came after the cancel took effect
    engine.stop()


def test_prompt_scores_are_the_models_log_softmax(lm):
    """echo + logprobs: each prompt token's score is log_softmax(model(prompt)) at the
    position before it (float32: 1e-5), with the top alternatives in order."""
    engine = Engine(lm.model, lm.tokenizer)
    got = Collector(1)
    prompt = lm.tokenizer.encode("the lazy dog jumps")
    params = SamplingParams(max_new_tokens=1, temperature=0)
    engine.submit(Job(prompt, params, 0, got.sink(0), prompt_logprobs=3))
    got.wait()
    with torch.no_grad():
        logp = lm.model(torch.tensor([prompt]))[0].log_softmax(-1)  # (P, V)
    scores = got.prompt[0]
    assert scores[0] is None and len(scores) == len(prompt)
    for pos, score in enumerate(scores[1:], start=1):
        assert score.id == prompt[pos]
        assert score.logprob == pytest.approx(logp[pos - 1, prompt[pos]].item(), abs=1e-5)
        top = logp[pos - 1].topk(3)
        assert [t for t, _ in score.top] == top.indices.tolist()
    assert got.end[0] == Finished("length", 0) and got.ids[0] == []
    engine.stop()


def test_a_model_without_a_kv_cache_is_batched_too(tokenizer):
    """A GRU (no cache: every step reruns the rows, left-padded): batched greedy output
    equals the library's."""
    torch.manual_seed(0)
    spec = {"family": "recurrent", "cell": "gru", "vocab_size": tokenizer.vocab_size, "d_model": 32}
    lm = LM(build_model(spec).eval(), tokenizer)
    engine = Engine(lm.model, lm.tokenizer, max_batch=4)
    assert not engine.cached
    got = Collector(4)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.submit(job(lm, prompt, got.sink(i), 6 + 3 * i, temperature=0))
    got.wait()
    for i, prompt in enumerate(PROMPTS[:4]):
        text, reason, n = alone(lm, prompt, 6 + 3 * i, temperature=0)
        assert (got.text[i], got.end[i]) == (text, Finished(reason, n))
    engine.stop()


def test_non_finite_logits_fail_only_that_job(tokenizer):
    """A model whose weights hold NaN: the job fails with the library's message, and the
    engine keeps serving."""
    model = tiny_model(tokenizer.vocab_size).eval()
    lm = LM(model, tokenizer)
    engine = Engine(model, tokenizer)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    got = Collector(1)
    engine.submit(job(lm, "the quick", got.sink(0), 5, temperature=0))
    got.wait()
    assert isinstance(got.end[0], Failed) and "NaN" in got.end[0].message
    assert got.end[0].user_error
    assert engine.active == 0
    engine.stop()
