"""Fine-tuning the encoder heads end to end on a tiny from-scratch encoder."""

import json

import pytest
import torch

import lmlab
from lmlab.checkpoint.io import save_checkpoint
from lmlab.data.tokenizers import BPETokenizer
from lmlab.errors import ConfigError
from lmlab.eval.heads import (
    encoder_with_head,
    finetune_head,
    head_data,
    score_head,
    task_rows,
)
from lmlab.models import build_model
from lmlab.train import TrainConfig
from lmlab.train.bert import SPECIALS


def config(tmp_path, name, steps, lr=2e-3):
    return TrainConfig(
        out_dir=str(tmp_path / name), max_steps=steps, lr=lr, batch_size=16, warmup_steps=2,
        eval_interval=steps, eval_batches=1, progress=False, seed=0,
    )  # fmt: skip


@pytest.mark.slow
def test_a_token_head_on_a_small_encoder_learns_and_reloads_predicting_the_same(tmp_path):
    result = finetune_head(
        "bert-tiny", "token", "full", max_len=48, config=config(tmp_path, "t", 40)
    )
    assert result.after["f1"] > result.before["f1"] + 0.2
    saved = json.loads((result.out_dir / "heads.json").read_text())
    assert saved["after"] == result.after and (result.out_dir / "heads.png").is_file()
    lm = lmlab.load(str(result.model_dir))
    assert lm.config["labels"] == list(result.labels) and lm.model.config.n_labels == len(
        result.labels
    )
    data = head_data("token")
    rows = task_rows(data, "test", lm.tokenizer, 48, 32)
    assert score_head(lm.model, data, rows, "test", 0) == result.after


@pytest.mark.slow
def test_lora_trains_the_adapters_and_the_head_and_reloads(tmp_path):
    result = finetune_head("bert-tiny", "sequence", "lora", config=config(tmp_path, "s", 4))
    assert 0 < result.trainable < result.total / 4
    lm = lmlab.load(str(result.model_dir))
    data = head_data("sequence")
    rows = task_rows(data, "test", lm.tokenizer, 128, 32)
    assert score_head(lm.model, data, rows, "test", 0) == result.after


def test_the_same_seed_builds_the_same_head():
    data = head_data("sequence")
    a, _, fresh = encoder_with_head("bert-tiny", data, seed=5)
    b, _, _ = encoder_with_head("bert-tiny", data, seed=5)
    assert fresh and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )
    assert a.config.head == "sequence" and a.config.n_labels == 2 and a.config.pooler


def test_bad_task_method_and_model_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="task='ner' is not one of sequence, token, span"):
        finetune_head("bert-tiny", "ner")
    with pytest.raises(ConfigError, match="method='qlora' is not one of full, lora"):
        finetune_head("bert-tiny", "token", "qlora")
    with pytest.raises(ConfigError, match="needs an encoder; preset 'gpt-char-tiny'"):
        encoder_with_head("gpt-char-tiny", head_data("token"))


def _checkpoint(tmp_path, head, labels):
    tok = BPETokenizer.train(
        "some words for a tokenizer", 300, eos_token=None, special_tokens=SPECIALS
    )
    spec = dict(family="encoder", vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                d_ff=32, max_seq_len=32, head=head, n_labels=len(labels))  # fmt: skip
    path = tmp_path / head
    save_checkpoint(path, build_model(spec), tokenizer=tok, extra_config={"labels": labels})
    return str(path)


def test_a_head_or_labels_that_do_not_fit_are_config_errors(tmp_path):
    token_model = _checkpoint(tmp_path, "token", ["O", "B-X", "I-X"])
    with pytest.raises(
        ConfigError, match="carries a token head, which does not fit task='sequence'"
    ):
        encoder_with_head(token_model, head_data("sequence"))
    with pytest.raises(
        ConfigError, match=r"labels \['O', 'B-X', 'I-X'\], the task has \['O', 'B-PER'"
    ):
        encoder_with_head(token_model, head_data("token"))
    # a causal LM has no encoder to put a head on
    gpt = tmp_path / "gpt"
    tok = BPETokenizer.train("some words", 300, eos_token=None, special_tokens=SPECIALS)
    save_checkpoint(gpt, build_model({"family": "transformer", "vocab_size": tok.vocab_size,
                                      "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32,
                                      "max_seq_len": 16}), tokenizer=tok)  # fmt: skip
    with pytest.raises(ConfigError, match="the span head needs an encoder"):
        encoder_with_head(str(gpt), head_data("span"))


@pytest.mark.slow
def test_a_pretrained_checkpoint_keeps_its_encoder_and_pooler_and_drops_mlm_and_nsp(tmp_path):
    from lmlab.train.bert import pretrain_encoder

    corpus = tmp_path / "t.txt"
    corpus.write_text("\n\n".join(f"A{i}:\nline one {i}\nline two {i}" for i in range(30)))
    run = tmp_path / "bert"
    pretrain_encoder("bert-tiny", str(corpus), vocab_size=300, max_len=32,
                     config=TrainConfig(out_dir=str(run), max_steps=1, batch_size=4,
                                        eval_batches=1, progress=False))  # fmt: skip
    pretrained = lmlab.load(str(run)).model
    net, _, fresh = encoder_with_head(str(run), head_data("sequence"), seed=0)
    assert not fresh and net.mlm is None and net.nsp is None
    theirs = pretrained.state_dict()
    for name, tensor in net.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, theirs[name]), name
