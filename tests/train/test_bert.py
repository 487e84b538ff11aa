"""BERT pretraining through the trainer: resumable masked pair batches, the loss's metrics,
a run that writes an encoder checkpoint lmlab loads."""

import json

import pytest
import torch

import lmlab
from lmlab.data.mlm import IGNORE, IS_NEXT
from lmlab.data.tokenizers import BPETokenizer
from lmlab.errors import ConfigError
from lmlab.train import TrainConfig
from lmlab.train.bert import (
    SPECIALS,
    PairBatches,
    documents_from_text,
    pretrain_encoder,
    regions_from_text,
)

TEXT = "\n\n".join(
    f"SPEAKER {i}:\n"
    + "\n".join(f"line {j} of speech {i} says {'ab' * (i % 5)} {j}" for j in range(3))
    for i in range(40)
)


def test_documents_are_blank_line_blocks_of_lines():
    tok = BPETokenizer.train(TEXT, 300, eos_token=None, special_tokens=SPECIALS)
    docs = documents_from_text(TEXT, tok)
    assert len(docs) == 40 and all(len(d) == 4 for d in docs)
    assert tok.decode(docs[3][1]) == "line 0 of speech 3 says ababab 0\n"


def test_regions_are_runs_of_lines_and_segment_batches_fill_max_len():
    tok = BPETokenizer.train(TEXT, 300, eos_token=None, special_tokens=SPECIALS)
    regions = regions_from_text(TEXT, tok, lines=30)
    lines = [line for line in TEXT.split("\n") if line.strip()]  # 160 lines
    assert [len(r) for r in regions] == [30] * 5 + [10]
    assert tok.decode(regions[1][0]) == lines[30] + "\n"  # the line keeps its break
    assert [len(r) for r in regions_from_text("a\nb\nc\n\nd\ne", tok, lines=100)] == [2, 2, 1]
    with pytest.raises(ConfigError, match="region_lines"):
        regions_from_text(TEXT, tok, lines=1)
    batch = PairBatches(regions, 16, 32, tok.vocab_size, seed=0).batch(0)
    real = batch["attention_mask"].sum(1)
    assert real.max() <= 32 and real.float().mean() > 24  # segments fill most of the row
    with pytest.raises(ConfigError, match="nsp_pairs"):
        PairBatches(regions, 16, 32, tok.vocab_size, seed=0, pairs="lines")
    with pytest.raises(ConfigError, match="nsp_pairs='lines' is invalid"):
        pretrain_encoder(nsp_pairs="lines", config=TrainConfig(out_dir="never-made"))


def test_pair_batches_are_a_function_of_seed_and_index_so_resume_is_exact():
    tok = BPETokenizer.train(TEXT, 300, eos_token=None, special_tokens=SPECIALS)
    docs = documents_from_text(TEXT, tok)
    a = PairBatches(docs, 8, 32, tok.vocab_size, seed=3)
    first = [a.next_batch() for _ in range(3)]
    b = PairBatches(docs, 8, 32, tok.vocab_size, seed=3)
    b.load_state_dict({"index": 2})
    assert all(torch.equal(first[2][k], v) for k, v in b.next_batch().items())
    batch = first[0]
    assert batch["ids"][:, 0].eq(1).all()  # [CLS] first, never masked
    assert (batch["labels"][:, 0] == IGNORE).all()
    assert set(batch["nsp_labels"].tolist()) <= {0, 1} and (batch["nsp_labels"] == IS_NEXT).any()


def test_a_short_run_logs_mlm_and_nsp_and_saves_a_loadable_encoder(tmp_path):
    corpus = tmp_path / "speeches.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, eval_interval=3,
        eval_batches=1, warmup_steps=1, progress=False,
    )  # fmt: skip
    spec = {
        "family": "encoder",
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 32,
        "max_seq_len": 32,
    }
    result = pretrain_encoder(spec, str(corpus), vocab_size=300, max_len=32, config=config)
    assert result.step == 3
    events = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [e for e in events if e["event"] == "train"][-1]
    assert {"mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"} <= set(train)
    evals = [e for e in events if e["event"] == "eval"]
    assert {"val_mlm_acc", "val_nsp_acc"} <= set(evals[-1])
    lm = lmlab.load(str(tmp_path / "run"))
    hidden = lm.model(torch.tensor([[1, 50, 2]]))
    assert lm.model.nsp_logits(hidden).shape == (1, 2) and lm.tokenizer.vocab_size == 300
    assert (tmp_path / "run" / "pretraining.png").stat().st_size > 10_000


@pytest.mark.slow  # about 30 s of CPU: 500 steps of bert-tiny
def test_nsp_learns_on_a_corpus_of_documents(tmp_path):
    # The classic failure, NSP stuck at 50% (a masked label, a broken pair): on documents
    # whose random second segments come from other articles, held-out NSP must rise far
    # above chance within a few hundred steps.
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=500, batch_size=32, lr=1e-3,
        eval_interval=500, eval_batches=10, progress=False,
    )  # fmt: skip
    pretrain_encoder("bert-tiny", "encyclopedia", nsp_pairs="sentences", config=config)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    final = [e for e in events if e["event"] == "eval"][-1]
    assert final["step"] == 500 and final["val_nsp_acc"] > 0.8, final
