"""BERT's pooler, NSP and fine-tuning heads equal transformers' given the same weights.

Tolerance: as in test_bert.py (fp32, 1e-5 absolute and relative; observed ~1e-6).
"""

import pytest
import torch
import transformers

from checkpoint.test_bert import ATOL, RTOL, padded_batch, randomise, tiny_bert_config
from lmlab.checkpoint.bert import convert_bert_state_dict, spec_from_bert_config
from lmlab.checkpoint.hf import load_converted
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import build_model


def converted(hf_model, **heads):
    spec = spec_from_bert_config(hf_model.config.to_dict(), **heads)
    model = build_model(spec)
    load_converted(model, convert_bert_state_dict(spec, dict(hf_model.state_dict())))
    return model.eval()


def test_pretraining_heads_match_bert_for_pretraining():
    torch.manual_seed(0)
    ref = randomise(transformers.BertForPreTraining(tiny_bert_config()))
    ours = converted(ref, mlm_head=True, pooler=True, nsp_head=True)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        hidden = ours(ids, mask, types)
        torch.testing.assert_close(
            ours.mlm_logits(hidden), want.prediction_logits, atol=ATOL, rtol=RTOL
        )
        torch.testing.assert_close(
            ours.nsp_logits(hidden), want.seq_relationship_logits, atol=ATOL, rtol=RTOL
        )


@pytest.mark.parametrize("labels", [2, 5])
def test_sequence_head_matches_bert_for_sequence_classification(labels):
    torch.manual_seed(labels)
    ref = randomise(transformers.BertForSequenceClassification(tiny_bert_config(num_labels=labels)))
    ours = converted(ref, pooler=True, head="sequence")
    assert ours.config.n_labels == labels
    ids, mask, types = padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(
            ours.head_logits(ours(ids, mask, types)), want, atol=ATOL, rtol=RTOL
        )


def test_token_head_matches_bert_for_token_classification():
    torch.manual_seed(1)
    ref = randomise(transformers.BertForTokenClassification(tiny_bert_config(num_labels=7)))
    ours = converted(ref, head="token")
    ids, mask, types = padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        torch.testing.assert_close(
            ours.head_logits(ours(ids, mask, types)), want, atol=ATOL, rtol=RTOL
        )


def test_span_head_matches_bert_for_question_answering():
    torch.manual_seed(2)
    ref = randomise(transformers.BertForQuestionAnswering(tiny_bert_config()))
    ours = converted(ref, head="span")
    ids, mask, types = padded_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        start, end = ours.head_logits(ours(ids, mask, types))
        torch.testing.assert_close(start, want.start_logits, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(end, want.end_logits, atol=ATOL, rtol=RTOL)


def test_missing_heads_and_bad_settings_get_one_line():
    ref = transformers.BertForTokenClassification(tiny_bert_config(num_labels=3))
    with pytest.raises(CheckpointError, match="'qa_outputs.weight' is missing"):
        converted(ref, head="span")
    with pytest.raises(CheckpointError, match="unexpected tensors.*classifier"):
        converted(ref)
    plain = build_model(
        {
            "family": "encoder",
            "vocab_size": 20,
            "d_model": 8,
            "n_heads": 2,
            "n_layers": 1,
            "d_ff": 8,
        }
    )
    with pytest.raises(ConfigError, match="no NSP head"):
        plain.nsp_logits(torch.zeros(1, 3, 8))
    with pytest.raises(ConfigError, match="set pooler=true"):
        build_model({"family": "encoder", "vocab_size": 20, "head": "sequence"})
