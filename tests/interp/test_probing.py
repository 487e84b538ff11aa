"""Probes with control tasks (``lmlab.interp.probing``).

No reference implementation exists to compare with, so the tests check the definitions
(Hewitt and Liang 2019) and probes on synthetic features whose answer is known by
construction, then that the pipeline runs on each family and on the real models.
"""

import json
from collections import Counter

import pytest
import torch

from lmlab.checkpoint.io import save_checkpoint
from lmlab.cli.main import main
from lmlab.data import CharTokenizer, load_corpus
from lmlab.data.probing import LabelledText, probing_task
from lmlab.errors import ConfigError
from lmlab.interp.hooks import run_with_cache
from lmlab.interp.probing import (
    ProbeConfig,
    Representations,
    collect,
    control_labels,
    layer_points,
    pick_points,
    probe_model,
    selectivity,
    sweep,
    train_probe,
    word_spans,
)
from lmlab.models import build_model, get_preset

SPECS = {
    "gpt": {**get_preset("gpt-char-tiny"), "n_layers": 2, "d_model": 32, "n_heads": 4},
    "lstm": {**get_preset("lstm-char"), "d_model": 16, "n_layers": 2},
    "mlp": {**get_preset("mlp-char"), "d_model": 8, "d_ff": 16},
    "encoder": {"family": "encoder", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64},
}


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.train(load_corpus("tinyshakespeare"))


def tiny(name, vocab_size, seed=0):
    torch.manual_seed(seed)
    return build_model({**SPECS[name], "vocab_size": vocab_size}).eval()


# ----------------------------------------------------------------------------- control task


def test_control_labels_are_a_function_of_the_type_and_follow_the_label_distribution():
    g = torch.Generator().manual_seed(0)
    n_types = 1500
    types = [f"w{t}" for t in torch.randint(0, n_types, (8000,), generator=g).tolist()]
    # task labels 60/30/10 %, varying within a type (as POS does for "watch")
    labels = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), 8000, True, generator=g)
    control, by_type = control_labels(types, labels, seed=1)
    seen = {}
    for t, c in zip(types, control.tolist(), strict=True):
        assert seen.setdefault(t, c) == c == by_type[t]  # same type -> same label
    # per type, the labels are draws from the task's empirical distribution: with ~1500
    # types the frequency of each label is within 0.04 (about 3 standard deviations)
    empirical = torch.bincount(labels, minlength=3).float() / len(labels)
    drawn = torch.bincount(torch.tensor(list(by_type.values())), minlength=3).float()
    torch.testing.assert_close(drawn / len(by_type), empirical, atol=0.04, rtol=0)
    # seeded, and independent of the order in which the words come
    again, _ = control_labels(types[::-1], labels.flip(0), seed=1)
    assert torch.equal(again.flip(0), control)
    assert not torch.equal(control_labels(types, labels, seed=2)[0], control)


def test_selectivity_is_task_accuracy_minus_control_accuracy():
    assert selectivity(0.9, 0.6) == pytest.approx(0.3)
    reps = linear_features(n_words=400, n_types=30)
    reps.features["y"] = reps.features["x"][:, :5]
    result = sweep(reps, probes=("linear",), config=ProbeConfig(max_epochs=5))
    assert [(r.point, r.layer, r.probe) for r in result.rows] == [("x", 0, "linear"), ("y", 1, "linear")]  # fmt: skip
    for row in result.rows:
        assert row.selectivity == pytest.approx(row.accuracy - row.control_accuracy)


# ----------------------------------------------------------------------------- synthetic features


def linear_features(n_words=1000, n_types=80, d_type=10, classes=4, seed=0, first_type=0):
    """Each word has a type and a label drawn independently; its vector is a random vector
    of its type (10 dims) beside a direction of its label (4 dims, far apart), plus a
    little noise. So the label is linear in the vector, and the control task (a random
    label per type) can be learnt only by memorising the types' vectors."""
    g = torch.Generator().manual_seed(seed)
    type_vec = torch.randn(
        first_type + n_types, d_type, generator=torch.Generator().manual_seed(99)
    )
    t = torch.randint(first_type, first_type + n_types, (n_words,), generator=g)
    y = torch.randint(0, classes, (n_words,), generator=g)
    label_vec = 3.0 * torch.randn(classes, 4, generator=torch.Generator().manual_seed(98))
    x = torch.cat([type_vec[t], label_vec[y]], 1) + 0.1 * torch.randn(
        n_words, d_type + 4, generator=g
    )
    groups = torch.arange(n_words) // 10  # "texts" of 10 words
    names = tuple("abcdefgh"[:classes])
    return Representations({"x": x}, y, [f"w{i}" for i in t.tolist()], groups, names, "syn")


def test_linear_probe_reads_a_linear_label_and_control_is_at_chance_on_unseen_types():
    train = linear_features(n_words=1000, n_types=80, seed=0)
    test = linear_features(n_words=600, n_types=40, seed=1, first_type=80)  # new types
    types = train.types + test.types
    control, _ = control_labels(types, torch.cat([train.labels, test.labels]), seed=0)
    c_train, c_test = control[: len(train.types)], control[len(train.types) :]
    x, y = train.features["x"], train.labels
    cfg = ProbeConfig(kind="linear")
    probe = train_probe(x[:800], y[:800], x[800:], y[800:], 4, cfg)
    assert probe.accuracy(test.features["x"], test.labels) > 0.98
    ctrl = train_probe(x[:800], c_train[:800], x[800:], c_train[800:], 4, cfg)
    # On types it never saw, a control label carries no information: the best a probe can
    # do is the most frequent label; the tolerance is ~3 standard deviations of 600 words.
    chance = Counter(c_test.tolist()).most_common(1)[0][1] / len(c_test)
    assert ctrl.accuracy(test.features["x"], c_test) < chance + 0.06


def test_linear_probe_is_more_selective_than_an_mlp_probe_of_equal_accuracy():
    """Hewitt and Liang's qualitative result, on features built so that the answer is known:
    the label is linear in the vectors, so both probes reach ~100% on the task, but the
    80 word types live in 10 dimensions, too few for a linear probe to shatter them, while
    an MLP with 256 hidden units memorises the control task's type -> label map. Equal task
    accuracy, very different selectivity: the MLP's accuracy says less about the features."""
    result = sweep(linear_features(), config=ProbeConfig(hidden=256))
    linear, mlp = (next(r for r in result.rows if r.probe == k) for k in ("linear", "mlp"))
    assert linear.accuracy > 0.98 and abs(linear.accuracy - mlp.accuracy) < 0.02
    assert mlp.control_accuracy > linear.control_accuracy + 0.3
    assert linear.selectivity > mlp.selectivity + 0.3


def test_probe_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="kind"):
        ProbeConfig(kind="svm")
    with pytest.raises(ConfigError, match="hidden"):
        ProbeConfig(hidden=0)


# ----------------------------------------------------------------------------- on models


def test_word_spans_cover_the_text(char_tok):
    text = LabelledText(("The", "dogs", "."), ("", " ", ""), ("DET", "NOUN", "PUNCT"))
    ids, spans = word_spans(char_tok, text)
    assert spans == [(0, 3), (3, 8), (8, 9)]
    assert ids == char_tok.encode("The dogs.")
    ids, spans = word_spans(char_tok, text, wrap=(0, 1))
    assert spans == [(1, 4), (4, 9), (9, 10)] and ids[0] == 0 and ids[-1] == 1


def test_layer_points_per_family(char_tok):
    V = char_tok.vocab_size
    assert layer_points(tiny("gpt", V)) == [
        "hook_embed",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    assert layer_points(tiny("lstm", V)) == ["hook_embed", "layers.0.hook_hidden", "layers.1.hook_hidden"]  # fmt: skip
    assert layer_points(tiny("mlp", V)) == ["hook_embed", "hook_hidden"]
    assert len(layer_points(tiny("encoder", V))) == 3
    assert pick_points(tiny("gpt", V), [2]) == ["blocks.1.hook_resid_post"]
    assert pick_points(tiny("gpt", V), names="blocks.*.hook_mlp_out") == [
        "blocks.0.hook_mlp_out",
        "blocks.1.hook_mlp_out",
    ]
    with pytest.raises(ConfigError, match=r"layers \[3\] do not exist.*0\.\.2"):
        pick_points(tiny("gpt", V), [0, 3])


@pytest.mark.parametrize("name", SPECS)
def test_collect_batched_equals_each_text_alone(name, char_tok):
    """The batch is right-padded; each word's vector must equal the one from running its
    text alone (causal models never see the padding; the encoder masks it)."""
    model = tiny(name, char_tok.vocab_size)
    task = probing_task("pos", 6)
    points = layer_points(model)
    reps = collect(model, char_tok, task, points, pool="mean", batch_size=4)
    labelled = task.labelled()
    assert reps.labels.shape == (len(labelled),) and reps.types == [w for _, _, w, _ in labelled]
    for p in points:
        assert reps.features[p].shape[0] == len(labelled)
    row = 0
    for i, text in enumerate(task.texts):
        ids, spans = word_spans(char_tok, text)
        _, cache = run_with_cache(model, torch.tensor([ids]), names=points)
        for span in spans:
            for p in points:
                alone = cache[p][0, span[0] : span[1]].mean(0)
                torch.testing.assert_close(reps.features[p][row], alone, atol=1e-5, rtol=1e-5)
            assert reps.groups[row] == i
            row += 1


def test_collect_refuses_texts_longer_than_the_context(char_tok):
    model = build_model({**SPECS["gpt"], "vocab_size": char_tok.vocab_size, "max_seq_len": 16})
    with pytest.raises(ConfigError, match="longer than the model's context of 16"):
        collect(model, char_tok, probing_task("shakespeare-speaker", 3), ["hook_embed"])


@pytest.mark.slow  # a whole command: the docs test runs lesson 12's runs/demo line in the fast suite
def test_probe_command_writes_figure_and_json(tmp_path, char_tok, capsys):
    save_checkpoint(tmp_path / "gpt", tiny("gpt", char_tok.vocab_size), tokenizer=char_tok)
    out = tmp_path / "out"
    argv = ["probe", "--model", str(tmp_path / "gpt"), "--task", "shakespeare-speaker"]
    argv += ["--n", "6", "--layers", "0,2", "--probe", "linear", "--out", str(out)]
    argv += ["--progress", "false"]
    assert main(argv) == 0
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"

    written = json.loads((out / "probe.json").read_text())
    rows = [(r["point"], r["layer"]) for r in written["rows"]]
    assert rows == [("hook_embed", 0), ("blocks.1.hook_resid_post", 2)]
    assert "select." in capsys.readouterr().out
    assert main(argv + ["--layers", "0,x"]) == 2


def test_misspelt_settings_fail_before_the_model_loads(tmp_path):
    nowhere = str(tmp_path / "no-model")
    with pytest.raises(ConfigError, match="probe 'svm' is unknown; valid: linear, mlp"):
        probe_model(nowhere, "pos", probes=("svm",))
    with pytest.raises(ConfigError, match="pool 'middle' is unknown"):
        probe_model(nowhere, "pos", pool="middle")
    with pytest.raises(ConfigError, match="probing task 'pso' is unknown"):
        probe_model(nowhere, "pso")


# ----------------------------------------------------------------------------- real models


@pytest.mark.slow
def test_smollm2_linear_probe_is_more_selective_than_mlp_probe_of_equal_accuracy():
    """Hewitt and Liang's result on a real model, as lesson 12 shows it: on SmolLM2's
    embeddings both probes learn the control task (the embedding *is* the word type); after
    block 26 both read part of speech at about the same accuracy, but the MLP also learns
    far more of the control task, so the linear probe is the more selective."""
    result = probe_model("smollm2", "pos", layers=[0, 27], progress=False)
    by = {(r.layer, r.probe): r for r in result.rows}
    assert min(by[0, k].control_accuracy for k in ("linear", "mlp")) > 0.97
    linear, mlp = by[27, "linear"], by[27, "mlp"]
    assert linear.accuracy > 0.95 and abs(linear.accuracy - mlp.accuracy) < 0.02
    assert linear.selectivity > mlp.selectivity + 0.03 > 0.03


@pytest.mark.slow
def test_minilm_encoder_probe_runs_with_cls_and_sep():
    from lmlab.lm import load

    lm = load("minilm", dtype="float32")
    task = probing_task("number", 60)
    ids, spans = word_spans(lm.tokenizer, task.texts[0], (lm.tokenizer.cls_id, lm.tokenizer.sep_id))
    assert ids == lm.tokenizer.encode(task.texts[0].text, add_special_tokens=True)
    reps = collect(lm.model, lm.tokenizer, task, layer_points(lm.model))
    assert len(reps.features) == 7 and reps.labels.shape == (60,)
    result = sweep(reps, probes=("linear",))
    assert len(result.rows) == 7


@pytest.mark.slow
def test_word_spans_match_smollm2s_own_tokenization():
    from lmlab.lm import load

    tok = load("smollm2", dtype="float32").tokenizer
    for text in probing_task("pos", 30).texts:
        assert word_spans(tok, text)[0] == tok.encode(text.text)
