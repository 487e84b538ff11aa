import json
import math

import numpy as np
import pytest
import tokenizers
import torch
import transformers

import lmlab.eval.choice as choice
from hf_models import tiny_llama
from lmlab.api import LM
from lmlab.checkpoint.hf import from_transformers
from lmlab.data import load_corpus
from lmlab.data.tokenizers import ByteTokenizer, CharTokenizer
from lmlab.errors import ConfigError
from lmlab.eval.choice import (
    build_prompt,
    evaluate_choice,
    fewshot_examples,
    mean_stderr,
)
from lmlab.eval.scoring import Continuation
from lmlab.eval.tasks import (
    TASK_DIR,
    ChoiceItem,
    ChoiceTask,
    PromptFormat,
    list_tasks,
    load_task,
)
from lmlab.models.ngram import NGramConfig, NGramLM


def make_task(n=6, pool=()):
    items = tuple(
        ChoiceItem(f"q{i}", ("yes", "no"), i % 2, id=str(i), subject="s" + str(i % 3))
        for i in range(n)
    )
    return ChoiceTask("t", items, fewshot=tuple(pool))


def test_metrics_differ_by_normalisation_on_a_stub_scorer(monkeypatch):
    """Choices chosen so each normalisation picks a different one (lengths without the
    delimiter; tokens include it):

        choice   ll    chars bytes tokens   ll/chars  ll/bytes  ll/tokens
        xx       -3    2     2     5        -1.5      -1.5      -0.6
        yyyyyy   -6    6     6     2        -1.0      -1.0      -3.0
        éé       -3.5  2     4     1        -1.75     -0.875    -3.5
        z        -20   1     1     40       -20       -20       -0.5
    acc -> 0, acc_norm -> 1, acc_bytes -> 2, acc_tokens -> 3; gold 1: only acc_norm right.
    """
    table = {" xx": (-3.0, 5), " yyyyyy": (-6.0, 2), " éé": (-3.5, 1), " z": (-20.0, 40)}
    seen = []

    def stub(lm, requests, batch_size, progress):
        seen.extend(requests)
        return [Continuation(table[c][0], table[c][1], False) for _, c in requests]

    monkeypatch.setattr(choice, "score_continuations", stub)
    item = ChoiceItem("Pick", ("xx", "yyyyyy", "éé", "z"), 1)
    result = evaluate_choice(None, ChoiceTask("stub", (item,)), progress=False)
    it = result.items[0]
    assert seen == [("Question: Pick\nAnswer:", c) for c in table]
    assert it.pred == {"acc": 0, "acc_norm": 1, "acc_bytes": 2, "acc_tokens": 3}
    assert it.n_chars == [2, 6, 2, 1] and it.n_bytes == [2, 6, 4, 1]
    scores = result.scores()
    assert [scores[m] for m in choice.METRICS] == [0.0, 1.0, 0.0, 0.0]
    p = np.exp([-3.0, -6.0, -3.5, -20.0])
    np.testing.assert_allclose(it.probs, p / p.sum(), rtol=1e-12)
    assert it.confidence == pytest.approx(it.probs[0])
    json.dumps(result.to_dict())  # JSON-serialisable (nan stderr with n=1 becomes null)
    assert result.to_dict()["scores"]["acc_stderr"] is None


def test_mean_stderr_is_the_sample_standard_error():
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.25 / 4))
    assert math.isnan(mean_stderr([1]))


def test_fewshot_never_shows_the_asked_item_and_is_seeded():
    task = make_task(6)
    for i in range(6):
        shots = fewshot_examples(task, i, 3, seed=1)
        assert len(shots) == 3 and task.items[i] not in shots
        assert len({s.id for s in shots}) == 3
        assert shots == fewshot_examples(task, i, 3, seed=1)
    draws = {tuple(s.id for s in fewshot_examples(task, 0, 3, seed=s)) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(ConfigError, match="hold only 5 example"):
        fewshot_examples(task, 0, 6)
    pool = [ChoiceItem("d0", ("yes", "no"), 0, id="d0"), ChoiceItem("d1", ("a", "b"), 1, id="d1")]
    shots = fewshot_examples(make_task(6, pool), 2, 2, seed=0)
    assert sorted(s.id for s in shots) == ["d0", "d1"]  # from the pool only


def test_fewshot_prompt_construction():
    pool = [ChoiceItem("2 + 2?", ("3", "4"), 1)]
    task = ChoiceTask(
        "t", (ChoiceItem("1 + 1?", ("2", "5"), 0),), fewshot=tuple(pool), description="Maths.\n\n"
    )
    item = task.items[0]
    assert build_prompt(task, item, fewshot_examples(task, 0, 1)) == (
        "Maths.\n\nQuestion: 2 + 2?\nAnswer: 4\n\nQuestion: 1 + 1?\nAnswer:"
    )
    assert build_prompt(task, item, []) == "Maths.\n\nQuestion: 1 + 1?\nAnswer:"


def test_result_table_has_a_row_per_subject(monkeypatch):
    monkeypatch.setattr(
        choice,
        "score_continuations",
        lambda lm, reqs, batch_size, progress: [
            Continuation(-1.0 if c == " yes" else -2.0, 1, False) for _, c in reqs
        ],
    )
    result = evaluate_choice(None, make_task(6), progress=False)  # always predicts "yes"
    rows = result.rows()
    assert [r["subject"] for r in rows] == ["all", "s0", "s1", "s2"]
    assert rows[0]["acc"] == pytest.approx(0.5) and rows[0]["n"] == 6
    assert result.by_subject()["s0"]["acc"] == pytest.approx(0.5)  # items 0 (yes) and 3 (no)
    assert "acc 0.500" in result.summary()
    assert evaluate_choice(None, make_task(6), limit=2, progress=False).n == 2


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    return LM(from_transformers(tiny_llama(vocab_size=256)), tok)


@pytest.mark.parametrize("name", sorted(list_tasks()))
def test_bundled_tasks_evaluate_end_to_end_on_a_tiny_model(tiny_lm, name):
    result = evaluate_choice(tiny_lm, load_task(name), num_fewshot=1, limit=8, progress=False)
    assert result.n == 8
    for it in result.items:
        assert sum(it.probs) == pytest.approx(1.0) and all(ll < 0 for ll in it.loglikelihoods)
    json.dumps(result.to_dict())


@pytest.mark.slow
def test_bundled_tasks_evaluate_on_an_ngram():
    """A character 5-gram fitted on Tiny Shakespeare beats chance on the cloze task, whose
    right answers are the corpus's own words (it has seen those lines; measured 0.75 acc
    with this seed-free setup, chance 0.25)."""
    corpus = load_corpus("tinyshakespeare")
    tasks = {n: load_task(n) for n in list_tasks()}
    text = "".join(
        it.query + "".join(it.choices) for t in tasks.values() for it in t.items + t.fewshot
    )
    tok = CharTokenizer(sorted(set(corpus + text + "\n?:QAuestionsw")))
    ids = tok.encode(corpus)
    lm = LM(NGramLM(NGramConfig(vocab_size=tok.vocab_size, order=5)).fit(ids), tok)
    results = {
        n: evaluate_choice(
            lm, t, batch_size=160, limit=None if n == "shakespeare-cloze" else 8, progress=False
        )
        for n, t in tasks.items()
    }
    assert [r.n for r in results.values()] == [
        40 if n == "shakespeare-cloze" else 8 for n in results
    ]
    assert results["shakespeare-cloze"].scores()["acc"] > 0.5


def make_hf_folder(folder):
    """A tiny random Llama with a byte-level BPE tokenizer, as a Hugging Face folder that
    both transformers/lm-eval and lmlab.load read."""
    text = load_task("world-facts").items
    corpus = "\n".join(it.query + " " + " ".join(it.choices) for it in text) * 3
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    hf = tiny_llama(vocab_size=tok.get_vocab_size(), max_position_embeddings=256)
    hf.config.bos_token_id = hf.config.eos_token_id = 0
    hf.save_pretrained(folder)


@pytest.mark.slow
def test_choice_loglikelihoods_match_lm_eval_harness(tmp_path, monkeypatch):
    """lm-evaluation-harness 0.4 runs fully offline (a local HF folder for HFLM, a YAML
    task reading local JSONL files) on the same items with 1 few-shot example from a dev
    file of one item (so both draw the same example). Prompts must be identical; per-choice
    log-likelihoods agree to 1e-4 abs (float32 on CPU, the same model and batching
    differences only); per-item acc/acc_norm and the task means are equal."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "model"
    make_hf_folder(folder)
    rows = [json.loads(x) for x in (TASK_DIR / "world_facts.jsonl").read_text().splitlines()]
    keep = [{k: r[k] for k in ("query", "choices", "gold")} for r in rows]
    (tmp_path / "dev.jsonl").write_text(json.dumps(keep[0]) + "\n")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep[5:17]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lmlab_parity.yaml").write_text(
        f"""task: lmlab_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "test.jsonl"}
    dev: {tmp_path / "dev.jsonl"}
  cache_dir: {tmp_path / "datasets"}
test_split: test
fewshot_split: dev
output_type: multiple_choice
doc_to_text: "Question: {{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    harness_lm = HFLM(
        pretrained=str(folder), tokenizer=str(folder), device="cpu", batch_size=4, dtype="float32"
    )
    out = lm_eval.simple_evaluate(
        model=harness_lm,
        tasks=["lmlab_parity"],
        num_fewshot=1,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        log_samples=True,
    )
    samples = sorted(out["samples"]["lmlab_parity"], key=lambda s: s["doc_id"])

    import lmlab

    lm = lmlab.load(folder)
    task = load_task(tmp_path / "test.jsonl", fewshot_path=tmp_path / "dev.jsonl")
    assert task.prompt == PromptFormat()  # the YAML's doc_to_text and target_delimiter
    ours = evaluate_choice(lm, task, num_fewshot=1, batch_size=5, progress=False)
    assert len(samples) == ours.n == 12
    for sample, item in zip(samples, ours.items):
        assert [a[0] for a in sample["arguments"]] == [item.prompt] * len(item.probs)
        expected = [r[0] for r in sample["filtered_resps"]]
        np.testing.assert_allclose(item.loglikelihoods, expected, atol=1e-4, rtol=0)
        assert sample["acc"] == float(item.correct["acc"])
        assert sample["acc_norm"] == float(item.correct["acc_norm"])
    got = out["results"]["lmlab_parity"]
    assert got["acc,none"] == pytest.approx(ours.scores()["acc"])
    assert got["acc_norm,none"] == pytest.approx(ours.scores()["acc_norm"])
    assert got["acc_stderr,none"] == pytest.approx(ours.scores()["acc_stderr"])


def test_items_a_character_vocabulary_cannot_encode_are_skipped_and_counted():
    from lmlab.api import LM
    from lmlab.data.tokenizers import CharTokenizer
    from lmlab.errors import DataError
    from lmlab.eval.tasks import ChoiceItem, ChoiceTask
    from lmlab.models import build_model, get_preset

    chars = "QuestionAnswer:? \nabcdxyz"
    torch.manual_seed(0)
    model = build_model(
        {**get_preset("gpt-char-tiny"), "vocab_size": len(set(chars)), "n_layers": 1}
    )
    lm = LM(model, CharTokenizer("".join(sorted(set(chars)))))
    items = [
        ChoiceItem("abc", ["x", "y"], 0, id="ok"),
        ChoiceItem("1 + 1", ["2", "3"], 0, id="digits"),
    ]
    result = evaluate_choice(lm, ChoiceTask("mixed", tuple(items)), progress=False)
    assert result.n == 1 and len(result.skipped) == 1 and result.skipped[0].startswith("digits:")
    assert "1 items skipped" in result.summary() and result.to_dict()["skipped"] == result.skipped
    with pytest.raises(DataError, match="encodes none of its 1 items"):
        evaluate_choice(lm, ChoiceTask("digits", tuple(items[1:])), progress=False)
