"""Generated seq2seq tasks, teacher-forced training through the trainer, and evaluation
with and without teacher forcing."""

import math

import pytest
import torch

import lmlab
from lmlab.data.seq2seq_tasks import EOS, TASKS, Seq2SeqVocab, number_words, seq2seq_pairs
from lmlab.errors import ConfigError
from lmlab.eval.seq2seq import evaluate_seq2seq, position_accuracy, train_and_score
from lmlab.eval.text import bleu
from lmlab.models import build_model
from lmlab.models.seq2seq import Seq2Seq
from lmlab.train import TrainConfig
from lmlab.train.metrics import read_metrics
from lmlab.train.seq2seq import IGNORE, Seq2SeqBatches, collate_pairs, train_seq2seq


def test_tasks_are_seeded_and_right():
    assert seq2seq_pairs("reverse", 5, 1) == seq2seq_pairs("reverse", 5, 1)
    for s, t in seq2seq_pairs("reverse", 50, 2):
        assert t == s[::-1]
    assert number_words(347) == "three hundred forty-seven" and number_words(20) == "twenty"
    assert number_words(105) == "one hundred five" and number_words(0) == "zero"
    for s, t in seq2seq_pairs("dates", 50, 3):
        y, m, d = t.split("-")
        assert y in s and str(int(d)) in s
    for name in TASKS:  # every character of every task is in its vocabulary
        vocab = Seq2SeqVocab.for_task(name)
        for s, t in seq2seq_pairs(name, 200, 9):
            assert vocab.decode(vocab.encode(s)) == s and vocab.decode(vocab.encode(t)) == t
    with pytest.raises(ConfigError, match="did you mean 'reverse'"):
        seq2seq_pairs("revers", 1, 0)


def test_collate_shifts_targets_and_ignores_padding():
    batch = collate_pairs([([5, 6], [7]), ([5], [8, 9, 10])])
    assert batch["tgt_in"].tolist() == [[1, 7, 0, 0], [1, 8, 9, 10]]
    assert batch["tgt_out"].tolist() == [[7, EOS, IGNORE, IGNORE], [8, 9, 10, EOS]]
    assert batch["src"].tolist() == [[5, 6], [5, 0]] and batch["n_tokens"].item() == (2 + 1 + 1) + (
        1 + 3 + 1
    )
    vocab = Seq2SeqVocab.for_task("copy")
    a = Seq2SeqBatches("copy", vocab, 4, seed=1)
    first = [a.next_batch() for _ in range(2)]
    b = Seq2SeqBatches("copy", vocab, 4, seed=1)
    b.load_state_dict({"index": 1})
    assert all(torch.equal(first[1][k], v) for k, v in b.next_batch().items())


def test_a_short_run_trains_through_the_trainer_and_loads(tmp_path):
    spec = {
        "family": "seq2seq",
        "d_model": 32,
        "n_heads": 2,
        "n_encoder_layers": 1,
        "n_decoder_layers": 1,
        "d_ff": 64,
        "max_seq_len": 32,
        "norm": "pre",
    }
    config = TrainConfig(
        out_dir=str(tmp_path / "run"),
        max_steps=20,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=20,
        eval_batches=1,
        progress=False,
    )
    result = train_seq2seq("copy", spec, config)
    vocab = Seq2SeqVocab.for_task("copy")
    first_loss = result.train_losses[0][1]
    assert first_loss > math.log(
        vocab.vocab_size
    )  # embeddings scaled by sqrt(d): confident at first
    assert result.step == 20 and result.val_losses[-1][1] < first_loss - 0.5
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "token_acc" in [e for e in events if e["event"] == "train"][-1]
    assert "val_token_acc" in [e for e in events if e["event"] == "eval"][-1]
    model = lmlab.load(str(tmp_path / "run")).model
    assert isinstance(model, Seq2Seq) and model.config.vocab_size == vocab.vocab_size


def test_evaluation_counts_as_by_hand():
    vocab = Seq2SeqVocab.for_task("reverse")
    torch.manual_seed(0)
    spec = {
        "family": "seq2seq",
        "vocab_size": vocab.vocab_size,
        "d_model": 16,
        "n_heads": 2,
        "n_encoder_layers": 1,
        "n_decoder_layers": 1,
        "d_ff": 16,
    }
    model = build_model(spec).eval()
    pairs = seq2seq_pairs("reverse", 6, 5)
    scores = evaluate_seq2seq(model, vocab, pairs, batch_size=4)
    right = total = exact = free_right = 0
    decoded = []
    for source, target in pairs:
        src = torch.tensor([vocab.encode(source)])
        tgt = vocab.encode(target)
        with torch.no_grad():
            predicted = model(src, torch.tensor([[1, *tgt]])).argmax(-1)[0].tolist()
            right += sum(p == t for p, t in zip(predicted, [*tgt, EOS]))
            total += len(tgt) + 1
            out = [1]
            while len(out) <= len(tgt) + 4 and (len(out) == 1 or out[-1] != EOS):
                out.append(int(model(src, torch.tensor([out]))[0, -1].argmax()))
        free_right += sum(o == t for o, t in zip(out[1:], [*tgt, EOS]))
        decoded.append(vocab.decode([t for t in out[1:] if t != EOS]))
        exact += decoded[-1] == target
    assert scores["tf_token_acc"] == pytest.approx(right / total)
    assert scores["exact"] == exact / len(pairs)
    assert scores["free_token_acc"] == pytest.approx(free_right / total)
    # one-word targets: BLEU over characters (over words, a right answer would score 0)
    assert scores["bleu_tokenize"] == "char"
    want = bleu(decoded, [t for _, t in pairs], tokenize="char").score
    assert scores["bleu"] == pytest.approx(want)
    assert [e["output"] for e in scores["examples"]] == decoded[:5]


def test_position_accuracy_scores_each_target_position_and_the_end():
    # the docstring's cases: 2 of 3, then 1 of 3 (an output cut short scores nothing after)
    assert position_accuracy([[5, 6, 2]], [[5, 7]], eos_id=2) == pytest.approx(2 / 3)
    assert position_accuracy([[5]], [[5, 7]], eos_id=2) == pytest.approx(1 / 3)
    # pooled over rows by positions, not averaged per row: (3 + 0) / (3 + 2)
    assert position_accuracy([[5, 7, 2], [9, 9, 9]], [[5, 7], [4]], 2) == pytest.approx(3 / 5)
    # one shifted token (a dropped letter) costs every position after it: exposure bias
    assert position_accuracy([[6, 7, 8, 2]], [[5, 6, 7, 8]], 2) == 0.0
    with pytest.raises(ValueError, match="2 outputs for 1 targets"):
        position_accuracy([[1], [2]], [[1]], 2)


def test_train_and_score_tracks_both_accuracies_at_every_evaluation(tmp_path):
    spec = {"family": "seq2seq", "d_model": 32, "n_heads": 2, "n_encoder_layers": 1,
            "n_decoder_layers": 1, "d_ff": 64, "max_seq_len": 32, "norm": "pre"}  # fmt: skip
    config = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=8,
                         warmup_steps=1, eval_interval=3, eval_batches=1, progress=False)  # fmt: skip
    scores = train_and_score("copy", spec, eval_n=4, track_n=5, config=config)
    curve = scores["curve"]
    assert [c["step"] for c in curve] == [3, 6]
    for point in curve:
        assert set(point) == {"step", "tf_token_acc", "free_token_acc", "tf_exact", "exact"}
        assert all(0.0 <= v <= 1.0 for k, v in point.items() if k != "step")
    assert (tmp_path / "run" / "seq2seq.png").stat().st_size > 10_000
    # the last point is the final model scored on the tracked pairs: rescore them by hand
    model = lmlab.load(str(tmp_path / "run")).model
    tracked = evaluate_seq2seq(
        model, Seq2SeqVocab.for_task("copy"), seq2seq_pairs("copy", 5, seed=-2_000_000 - 1337)
    )
    assert curve[-1]["free_token_acc"] == pytest.approx(tracked["free_token_acc"])
    assert curve[-1]["tf_token_acc"] == pytest.approx(tracked["tf_token_acc"])
