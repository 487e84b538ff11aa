"""The generated extractive-QA set and its doc_stride windows."""

import pytest

from lmlab.checkpoint.pretrained import pretrained_path
from lmlab.data.qa import qa_examples, qa_features
from lmlab.data.tokenizers import HFTokenizer
from lmlab.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return HFTokenizer.from_file(pretrained_path("minilm") / "tokenizer.json")


def test_answers_sit_at_their_offsets():
    examples = qa_examples("train", n=100)
    assert examples == qa_examples("train", n=100)
    for e in examples:
        assert e.context[e.answer_start : e.answer_start + len(e.answer)] == e.answer


@pytest.mark.parametrize("max_length, doc_stride", [(64, 16), (96, 32)])
def test_every_answer_is_whole_in_some_window_and_maps_back_exactly(
    tokenizer, max_length, doc_stride
):
    examples = qa_examples("validation", n=60)
    features = qa_features(examples, tokenizer, max_length, doc_stride)
    assert all(len(f.ids) <= max_length for f in features)
    windows = {}
    for f in features:
        windows.setdefault(f.example, []).append(f)
        e = examples[f.example]
        assert f.ids[0] == tokenizer.cls_id and f.ids.count(tokenizer.sep_id) == 2
        assert len(f.ids) == len(f.token_type_ids) == len(f.offsets)
        if f.start:  # the labelled tokens cut the exact answer out of the context
            text = e.context[f.offsets[f.start][0] : f.offsets[f.end][1]]
            assert text == e.answer and f.token_type_ids[f.start] == 1
        else:  # not in this window: both targets on [CLS]
            assert f.end == 0
    assert len(windows) == len(examples)
    assert any(len(w) > 1 for w in windows.values())  # some contexts need several windows
    for index, ws in windows.items():
        assert any(f.start > 0 for f in ws), examples[index]
        # consecutive windows share doc_stride context tokens
        for a, b in zip(ws, ws[1:]):
            shared = set(o for o in a.offsets if o) & set(o for o in b.offsets if o)
            assert len(shared) == doc_stride


def test_a_window_too_small_for_the_stride_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="doc_stride=40 must be smaller"):
        qa_features(qa_examples("test", n=1), tokenizer, max_length=48, doc_stride=40)
