"""The three architectures compared: their rows, losses and scores at a tiny size."""

import json

import pytest
import torch

from lmlab.data.seq2seq_tasks import BOS, EOS, PAD
from lmlab.errors import ConfigError, DataError
from lmlab.eval.architectures import (
    NEG,
    POS,
    ArchitecturesConfig,
    build,
    classify_loss,
    classify_rows,
    compare_architectures,
    decoder_rows,
    encoder_rows,
    label_logits,
    read_sentiment,
    seq2seq_outputs,
)
from lmlab.train.seq2seq import IGNORE

TINY = dict(d_model=16, n_heads=2, d_ff=32, n_layers=2, progress=False)


def test_decoder_rows_put_the_loss_on_the_target_and_its_end_only():
    rows = decoder_rows([([5, 6], [7]), ([8], [9, 10])])
    assert rows["ids"].tolist() == [[5, 6, BOS, 7], [8, BOS, 9, 10]]
    assert rows["targets"].tolist() == [[IGNORE, IGNORE, 7, EOS], [IGNORE, 9, 10, EOS]]
    enc = encoder_rows([([5, 6, 7], [7, 6, 5]), ([8], [8])])
    assert enc["ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert enc["targets"].tolist() == [[7, 6, 5], [8, IGNORE, IGNORE]]
    with pytest.raises(DataError, match="one token per source position"):
        encoder_rows([([5, 6], [7])])


def test_the_label_is_a_token_for_the_decoders_and_a_head_for_the_encoder():
    config = ArchitecturesConfig(**TINY)
    rows = [([7, 8, 9], 1), ([10], 0)]
    for arch in ("decoder", "encoder-decoder"):
        model = build(arch, 12, config).eval()
        batch = classify_rows(arch, rows)
        if arch == "decoder":  # words [SEP]: the label comes after the last real token
            assert batch["ids"].tolist() == [[7, 8, 9, EOS], [10, EOS, PAD, PAD]]
            logits = torch.stack([model(batch["ids"][i : i + 1, : n + 1])[0, -1] for i, n in
                                  enumerate(batch["last"].tolist())])  # fmt: skip
        else:
            logits = model(batch["src"], torch.full((2, 1), BOS))[:, 0]
        torch.testing.assert_close(label_logits(arch, model, batch), logits[:, [NEG, POS]])
        want = torch.nn.functional.cross_entropy(logits, torch.tensor([POS, NEG]))
        torch.testing.assert_close(classify_loss(arch, model, batch), want)
    encoder = build("encoder", 12, config, head="sequence", pooler=True, n_labels=2).eval()
    batch = classify_rows("encoder", rows)
    assert batch["ids"].tolist() == [[BOS, 7, 8, 9], [BOS, 10, PAD, PAD]]
    assert label_logits("encoder", encoder, batch).shape == (2, 2)


def test_free_running_outputs_of_each_architecture_end_where_decoding_stopped():
    config = ArchitecturesConfig(**TINY)
    pairs = [([5, 6, 7], [7, 6, 5]), ([8, 9], [9, 8])]
    enc = build("encoder", 12, config, head="token", n_labels=12).eval()
    outputs = seq2seq_outputs("encoder", enc, pairs)
    assert [len(o) for o in outputs] == [4, 3] and all(o[-1] == EOS for o in outputs)
    for arch in ("decoder", "encoder-decoder"):
        outputs = seq2seq_outputs(arch, build(arch, 12, config).eval(), pairs)
        assert all(1 <= len(o) <= 3 + 4 for o in outputs)  # at most the longest target + 4
        assert all(EOS not in o[:-1] for o in outputs)


def test_a_tiny_comparison_writes_one_table_and_one_figure(tmp_path):
    config = ArchitecturesConfig(task="dates", steps=2, classify_steps=2, folds=2, eval_n=3,
                                 **TINY)  # fmt: skip
    report = compare_architectures(config, tmp_path)
    results = report["results"]
    assert [(r["problem"], r["architecture"]) for r in results] == [
        (p, a) for p in ("dates", "sentiment") for a in ("encoder", "decoder", "encoder-decoder")
    ]
    assert "n/a" in results[0]["note"] and "score" not in results[0]  # dates: lengths differ
    for r in results[1:]:
        assert 0.0 <= r["score"] <= 1.0 and r["params"] > 0 and len(r["losses"]) == 2
    # the sentiment score is over all 40 sentences, each held out once
    assert all(round(r["score"] * 40) == r["score"] * 40 for r in results[3:])
    saved = json.loads((tmp_path / "architectures.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    assert "| dates | encoder |" in (tmp_path / "architectures.md").read_text()
    assert (tmp_path / "architectures.png").stat().st_size > 10_000


def test_bad_settings_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="task='revers' is invalid"):
        ArchitecturesConfig(task="revers")
    with pytest.raises(ConfigError, match="n_layers=3 is invalid"):
        ArchitecturesConfig(n_layers=3)
    bad = tmp_path / "s.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    with pytest.raises(DataError, match=r"s.tsv:3"):
        read_sentiment(bad)
    assert read_sentiment()[0] == ("clever , charming and full of heart".split(), 1)
