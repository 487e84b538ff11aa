"""lm-evaluation-harness's ``local-completions`` model against ``lmlab serve``: the same
accuracy as lmlab's in-process evaluation, each log-likelihood within 1e-4.

How lm-eval tokenizes here: its log-likelihood requests need a tokenizer on the client
side, to know where the context ends (``ctxlen``) in the echoed logprobs. With
``tokenizer_backend=None`` lm-eval 0.4.13 refuses log-likelihood tasks outright ("Tokenizer
is required for loglikelihood tasks"), and ``huggingface`` would need a hub download. So
the test uses ``tokenizer_backend=remote``: lm-eval's ``RemoteTokenizer`` asks the server
(``/tokenizer_info``, ``/tokenize``, ``/detokenize``, vLLM's routes), which encodes with the
model's own tokenizer, offline; with ``tokenized_requests=True`` it then sends token ids,
and each request is ``echo=True, logprobs=1, max_tokens=1``, scored from the echoed prompt
logprobs. The context/continuation split is lm-eval's (encode(context + continuation)
after len(encode(context))), which is also what ``lmlab.eval.scoring`` does.

The model: a tiny random Llama with a BPE tokenizer trained on the task's text, as an
lmlab checkpoint; the task: 12 items of the bundled ``world-facts`` as a local lm-eval
YAML task (as ``tests/eval/test_harness.py`` builds it).
"""

import json

import numpy as np
import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.data import BPETokenizer
from lmlab.eval.run import evaluate
from lmlab.eval.tasks import TASK_DIR
from lmlab.models import build_model, get_preset
from servers import Server

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, task folder, the items' JSONL)."""
    root = tmp_path_factory.mktemp("lm_eval_serve")
    rows = [json.loads(line) for line in (TASK_DIR / "world_facts.jsonl").read_text().splitlines()]
    items = [{k: r[k] for k in ("query", "choices", "gold")} for r in rows if "split" not in r]
    path = root / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items[:12]))
    text = "\n".join(r["query"] + " " + " ".join(r["choices"]) for r in rows)
    tok = BPETokenizer.train(text + " Question: Answer:", 320, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    small = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 128, "max_seq_len": 128}
    spec = {**get_preset("llama-small"), "vocab_size": tok.vocab_size, **small}
    save_checkpoint(root / "model", build_model(spec).eval(), tokenizer=tok)
    (root / "tasks").mkdir()
    # lmlab's default prompt format: "Question: {query}\nAnswer:" + " " + choice
    (root / "tasks" / "lmlab_world_facts.yaml").write_text(
        f"""task: lmlab_world_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
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
    return root / "model", root / "tasks", path


@pytest.mark.slow
def test_local_completions_against_lmlab_serve_equals_lmlab_eval(files, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tasks, items = files
    server = Server(["--ckpt", str(model), "--dtype", "float32", "--name", "tiny"])
    try:
        args = (
            f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=128"
        )
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["lmlab_world_facts"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True,
        )
    finally:
        assert server.stop() == 0
    samples = sorted(out["samples"]["lmlab_world_facts"], key=lambda s: s["doc_id"])
    (ours,) = evaluate(str(model), str(items), dtype="float32", batch_size=7)
    assert ours.error is None and len(samples) == ours.n == 12
    for sample, item in zip(samples, ours.result.items):
        served = [r[0] for r in sample["filtered_resps"]]
        np.testing.assert_allclose(served, item.loglikelihoods, atol=1e-4, rtol=0)
        assert sample["acc"] == float(item.correct["acc"])
        assert sample["acc_norm"] == float(item.correct["acc_norm"])
    got = out["results"]["lmlab_world_facts"]
    assert got["acc,none"] == pytest.approx(ours.scores["acc"])
    assert got["acc_norm,none"] == pytest.approx(ours.scores["acc_norm"])
