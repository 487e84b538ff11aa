"""lm-evaluation-harness runs lmlab models (``lmlab.eval.harness``): its scores are lmlab's.

The model: a tiny random Llama with a BPE tokenizer (end-of-document token included),
saved as an lmlab checkpoint. The task: the bundled ``world-facts`` items as a local
lm-eval YAML task (no download: ``dataset_path: json`` on local files).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lmlab
from lmlab.checkpoint.io import save_checkpoint
from lmlab.data import BPETokenizer
from lmlab.eval.run import evaluate
from lmlab.eval.tasks import TASK_DIR
from lmlab.generate.likelihood import token_nll
from lmlab.models import build_model, get_preset

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency")
from lm_eval.api.instance import Instance  # noqa: E402

from lmlab.errors import ConfigError  # noqa: E402
from lmlab.eval.harness import LMLabHarness  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, task folder, the items' JSONL) for the tests of this file."""
    root = tmp_path_factory.mktemp("harness")
    rows = [json.loads(line) for line in (TASK_DIR / "world_facts.jsonl").read_text().splitlines()]
    evaluated = [{k: r[k] for k in ("query", "choices", "gold")} for r in rows if "split" not in r][
        :12
    ]
    items = root / "items.jsonl"
    items.write_text("".join(json.dumps(r) + "\n" for r in evaluated))
    text = "\n".join(r["query"] + " " + " ".join(r["choices"]) for r in rows)
    tok = BPETokenizer.train(text + " Question: Answer:", 320)
    torch.manual_seed(0)
    small = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 96}
    spec = {**get_preset("llama-small"), "vocab_size": tok.vocab_size, **small}
    save_checkpoint(root / "model", build_model(spec).eval(), tokenizer=tok)
    (root / "tasks").mkdir()
    # lmlab's default prompt format (PromptFormat()): "Question: {query}\nAnswer:" + " " + choice
    (root / "tasks" / "lmlab_world_facts.yaml").write_text(
        f"""task: lmlab_world_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
  cache_dir: {root / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    return root / "model", root / "tasks", items


def request(kind, *args):
    return Instance(kind, doc={}, arguments=args, idx=0)


@pytest.mark.slow
def test_lm_eval_scores_equal_lmlab_eval(files, monkeypatch):
    """lm-eval's simple_evaluate with ``--model lmlab`` against ``lmlab eval`` (the same
    function, ``lmlab.eval.run.evaluate``) on the same 12 items, 0-shot: the prompts are
    identical, per-choice log-likelihoods agree to 1e-5 abs (the same code; only the
    batches differ, float32 on CPU), per-item acc/acc_norm and the means are equal."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tasks, items = files
    out = lm_eval.simple_evaluate(
        model="lmlab",
        model_args=f"path={model},dtype=float32",
        tasks=["lmlab_world_facts"],
        batch_size=5,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    samples = sorted(out["samples"]["lmlab_world_facts"], key=lambda s: s["doc_id"])
    (ours,) = evaluate(str(model), str(items), dtype="float32", batch_size=7)
    assert ours.error is None and len(samples) == ours.n == 12
    for sample, item in zip(samples, ours.result.items):
        assert [a[0] for a in sample["arguments"]] == [item.prompt] * len(item.probs)
        harness = [r[0] for r in sample["filtered_resps"]]
        np.testing.assert_allclose(harness, item.loglikelihoods, atol=1e-5, rtol=0)
        assert sample["acc"] == float(item.correct["acc"])
        assert sample["acc_norm"] == float(item.correct["acc_norm"])
    got = out["results"]["lmlab_world_facts"]
    assert got["acc,none"] == pytest.approx(ours.scores["acc"])
    assert got["acc_norm,none"] == pytest.approx(ours.scores["acc_norm"])


def test_rolling_loglikelihood_is_minus_the_token_nll_sum(files):
    """A text's rolling log-likelihood is -sum(token_nll([eos] + ids)); for a text that
    fits the context, also the direct sum of log-softmax at each next token (float32
    summed in float64: 1e-4 abs)."""
    model, _, _ = files
    lm = lmlab.load(model, dtype="float32")
    harness = LMLabHarness(lm=lm, batch_size=4)
    texts = ["The capital of France is Paris.", "Cats say meow. " * 20]
    got = harness.loglikelihood_rolling(
        [request("loglikelihood_rolling", t) for t in texts], disable_tqdm=True
    )
    eos = lm.tokenizer.eos_id
    for text, value in zip(texts, got):
        ids = [eos] + lm.tokenizer.encode(text)
        assert value == pytest.approx(-token_nll(lm.model, ids).double().sum().item(), abs=1e-6)
    ids = torch.tensor([eos] + lm.tokenizer.encode(texts[0]))
    with torch.no_grad():
        logp = lm.model(ids[None, :-1])[0].float().log_softmax(-1)  # (T, V)
    direct = logp.gather(-1, ids[1:, None]).double().sum().item()
    assert got[0] == pytest.approx(direct, abs=1e-4)
    assert len(lm.tokenizer.encode(texts[1])) > lm.model.config.max_seq_len  # windows slide


def test_loglikelihood_is_lmlabs_scoring_and_generation_stops_at_until(files):
    model, _, _ = files
    lm = lmlab.load(model, dtype="float32")
    harness = LMLabHarness(lm=lm, batch_size=2)
    pairs = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("", "Paris"), ("A b", " c d")]
    scored = harness.loglikelihood([request("loglikelihood", *p) for p in pairs], True)
    from lmlab.eval.scoring import score_continuations

    expected = score_continuations(lm, pairs, batch_size=16)
    for (logprob, greedy), e in zip(scored, expected):
        assert logprob == pytest.approx(e.logprob, abs=1e-5) and greedy == e.is_greedy
    prompts = ["Question: What is", "The capital", "Cats"]
    settings = [
        {"until": ["\n"], "max_gen_toks": 12},
        {"until": "e", "max_gen_toks": 8},
        {"until": ["\n"], "max_gen_toks": 12},
    ]
    texts = harness.generate_until(
        [request("generate_until", p, s) for p, s in zip(prompts, settings)], True
    )
    for prompt, setting, text in zip(prompts, settings, texts):
        until = setting["until"] if isinstance(setting["until"], list) else [setting["until"]]
        alone = lm.generate(
            prompt, max_new_tokens=setting["max_gen_toks"], temperature=0, stop=until
        )
        assert text == alone and not any(u in text for u in until)


def test_bad_model_args_are_one_clear_error(files):
    model, _, _ = files
    with pytest.raises(ConfigError, match="unknown model_args for the lmlab model: pretrained"):
        LMLabHarness(path=str(model), pretrained="gpt2")
    with pytest.raises(ConfigError, match="needs one of path="):
        LMLabHarness()


@pytest.mark.slow
def test_python_m_lmlab_eval_harness_runs_lm_evals_command_line(files, tmp_path):
    """The documented command: lm-eval's own CLI with the lmlab model registered (its
    default --device, cuda:0, falls back to auto on a machine without CUDA)."""
    model, tasks, _ = files
    command = [sys.executable, "-m", "lmlab.eval.harness", "--model", "lmlab"]
    command += ["--model_args", f"path={model}", "--tasks", "lmlab_world_facts"]
    command += ["--include_path", str(tasks), "--limit", "4", "--batch_size", "4"]
    command += ["--output_path", str(tmp_path / "out")]
    env = {**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lmlab_world_facts" in done.stdout and "acc" in done.stdout


def test_registering_lmlab_leaves_lm_evals_own_models_found():
    # in a fresh process: lm-eval fills its registry on first lookup only when it is empty
    code = (
        "import lmlab.eval.harness\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('lmlab').__name__, get_model('local-completions').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["LMLabHarness", "LocalCompletionsAPI"]
