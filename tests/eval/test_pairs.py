import json

import numpy as np
import pytest
import torch

from hf_models import tiny_llama
from lmlab.api import LM
from lmlab.checkpoint.hf import from_transformers
from lmlab.data.tokenizers import ByteTokenizer, CharTokenizer
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.eval import pairs as pairs_module
from lmlab.eval.pairs import (
    BiasPair,
    MinimalPair,
    bias_score,
    evaluate_minimal_pairs,
    read_bias_pairs,
    read_minimal_pairs,
    sentence_logprobs,
    split_at_one_word,
)
from lmlab.eval.scoring import score_continuations
from lmlab.models import build_model, get_preset
from lmlab.models.ngram import NGramConfig, NGramLM


class ByteWithEos(ByteTokenizer):
    def __init__(self):
        super().__init__()
        self.eos_id = 0


@pytest.fixture(scope="module")
def llama_lm():
    torch.manual_seed(0)
    return LM(from_transformers(tiny_llama(vocab_size=256)), ByteWithEos())


@pytest.fixture(scope="module")
def char_lm():
    torch.manual_seed(0)
    chars = " .'TabcdefghijklmnopqrstuvwxyzS"
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": len(chars), "n_layers": 1}
    return LM(build_model(spec), CharTokenizer(chars))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- reading


def test_read_minimal_pairs_reads_blimp_rows_and_tolerates_missing_optional_fields(tmp_path):
    full = {
        "sentence_good": "The dog barks.",
        "sentence_bad": "The dog bark.",
        "field": "morphology",
        "linguistics_term": "subject_verb_agreement",
        "UID": "sv_simple",
        "one_prefix_method": True,  # other BLiMP keys are ignored
        "pair_id": 7,
    }
    bare = {"sentence_good": "She ate.", "sentence_bad": "She eated."}
    path = write(tmp_path / "p.jsonl", json.dumps(full) + "\n" + json.dumps(bare) + "\n")
    a, b = read_minimal_pairs(path)
    assert (a.good, a.bad, a.uid, a.linguistics_term, a.field, a.pair_id) == (
        "The dog barks.",
        "The dog bark.",
        "sv_simple",
        "subject_verb_agreement",
        "morphology",
        7,
    )
    assert a.source == f"{path}:1"
    assert (b.uid, b.linguistics_term, b.pair_id, b.source) == (
        "unknown",
        "unknown",
        None,
        f"{path}:2",
    )


def test_read_minimal_pairs_errors_name_file_line_and_expected_fields(tmp_path):
    good = json.dumps({"sentence_good": "A b.", "sentence_bad": "B a."})
    path = write(tmp_path / "p.jsonl", good + "\n" + json.dumps({"sentence_good": "x"}) + "\n")
    with pytest.raises(
        DataError, match=r"p.jsonl:2: missing 'sentence_bad'; expected 'sentence_good'"
    ):
        read_minimal_pairs(path)
    path = write(tmp_path / "q.jsonl", good + "\n{not json\n")
    with pytest.raises(DataError, match=r"q.jsonl:2: invalid JSON"):
        read_minimal_pairs(path)
    path = write(tmp_path / "r.jsonl", json.dumps({"sentence_good": " ", "sentence_bad": "a"}))
    with pytest.raises(DataError, match=r"r.jsonl:1: sentence_good must be a non-empty string"):
        read_minimal_pairs(path)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_minimal_pairs(tmp_path / "missing.jsonl")


CSV = (
    ",sent_more,sent_less,stereo_antistereo,bias_type,annotations\n"
    '0,"The cook, a woman, was tired.","The cook, a man, was tired.",stereo,gender,"[[\'gender\']]"\n'
    '1,"He said ""hi""\nand left.","She said ""hi""\nand left.",antistereo,gender,[]\n'
    "2,Grandpa was slow.,The boy was slow.,stereo,age,[]\n"
)


def test_read_bias_pairs_parses_quoted_csv_fields(tmp_path):
    a, b, c = read_bias_pairs(write(tmp_path / "b.csv", CSV))
    assert (a.sent_more, a.sent_less, a.direction, a.bias_type) == (
        "The cook, a woman, was tired.",
        "The cook, a man, was tired.",
        "stereo",
        "gender",
    )
    assert b.sent_more == 'He said "hi"\nand left.' and b.direction == "antistereo"
    # the second record spans lines 3-5 (each sentence holds a newline): the third is on 6
    assert (a.source.split(":")[-1], b.source.split(":")[-1], c.source.split(":")[-1]) == (
        "2",
        "3",
        "6",
    )


def test_read_bias_pairs_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "b.csv", CSV + "3,A x.,B x.,sideways,age,[]\n")
    with pytest.raises(DataError, match=r"b.csv:7: stereo_antistereo='sideways' is invalid"):
        read_bias_pairs(bad)
    short = write(tmp_path / "s.csv", CSV + "3,A x.,B x.\n")
    with pytest.raises(DataError, match=r"s.csv:7: 3 fields where the header has 6"):
        read_bias_pairs(short)
    nohead = write(tmp_path / "h.csv", "sent_more,sent_less,bias_type\na,b,age\n")
    with pytest.raises(DataError, match=r"h.csv:1: missing column\(s\) 'stereo_antistereo'"):
        read_bias_pairs(nohead)
    empty = write(tmp_path / "e.csv", CSV.splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no pairs under the header"):
        read_bias_pairs(empty)
    with pytest.raises(DataNotFoundError):
        read_bias_pairs(tmp_path / "missing.csv")


def test_bundled_files_load():
    pairs = read_minimal_pairs()
    assert 40 <= len(pairs) <= 60
    terms = {p.linguistics_term for p in pairs}
    assert terms == {
        "subject_verb_agreement",
        "determiner_noun_agreement",
        "anaphor_agreement",
        "irregular_forms",
        "npi_licensing",
        "word_order",
    }
    assert all(p.good != p.bad for p in pairs)
    assert len({p.pair_id for p in pairs}) == len(pairs)
    bias = read_bias_pairs()
    assert 15 <= len(bias) <= 30
    assert {p.direction for p in bias} == {"stereo", "antistereo"}
    assert all(p.sent_more != p.sent_less for p in bias)


# ----------------------------------------------------------------------------- the maths


def test_split_at_one_word():
    assert split_at_one_word("The cats are here.", "The cats is here.") == (
        "The cats ",
        "are",
        "is",
    )
    assert split_at_one_word("She doesn't ever eat.", "She does ever eat.") == (
        "She ",
        "doesn't",
        "does",
    )
    assert split_at_one_word("The boy washed himself.", "The boy washed herself.") == (
        "The boy washed ",
        "himself",
        "herself",
    )
    assert split_at_one_word("Nobody has ever left.", "Somebody has ever left.") is None  # first
    assert split_at_one_word("The dog chased the cat.", "The dog the cat chased.") is None
    assert split_at_one_word("We left.", "We have left.") is None  # word counts differ


def test_full_method_matches_token_logprobs_summed_by_hand(llama_lm, char_lm):
    """With an end-of-document token every token is scored after it; without one, from
    the second token. Tolerance 1e-4: float32 sums of a few dozen log-probs."""
    pair = MinimalPair("The cats sleep.", "The cats sleeps.")
    for lm, start in ((llama_lm, "eos"), (char_lm, "second token")):
        result = evaluate_minimal_pairs(lm, [pair], method="full")
        assert result.start == start
        for sentence, got in (
            (pair.good, result.items[0].good_logprob),
            (pair.bad, result.items[0].bad_logprob),
        ):
            ids = lm.tokenizer.encode(sentence)
            if start == "eos":
                ids = [lm.tokenizer.eos_id] + ids
            x = torch.tensor([ids])
            with torch.no_grad():
                logp = lm.model(x).log_softmax(-1)[0, :-1]  # (T-1, V): predicts ids[1:]
            expected = logp.gather(-1, x[0, 1:, None]).sum().item()
            assert got == pytest.approx(expected, abs=1e-4)


def test_prefix_method_scores_only_the_differing_word(llama_lm):
    pair = MinimalPair("The cats are asleep now.", "The cats is asleep now.")
    result = evaluate_minimal_pairs(llama_lm, [pair], method="prefix")
    direct = score_continuations(llama_lm, [("The cats ", "are"), ("The cats ", "is")])
    item = result.items[0]
    assert item.method == "prefix" and result.fallbacks == 0
    assert item.good_logprob == pytest.approx(direct[0].logprob, abs=1e-6)
    assert item.bad_logprob == pytest.approx(direct[1].logprob, abs=1e-6)
    full = evaluate_minimal_pairs(llama_lm, [pair], method="full").items[0]
    assert full.good_logprob != pytest.approx(item.good_logprob)  # the rest is not scored


def test_prefix_method_falls_back_to_full_and_counts_it(llama_lm):
    word_order = MinimalPair("The dog chased the cat.", "The dog the cat chased.")
    agreement = MinimalPair("The dog barks.", "The dog bark.")
    result = evaluate_minimal_pairs(llama_lm, [word_order, agreement], method="prefix")
    assert result.fallbacks == 1
    assert [i.method for i in result.items] == ["full", "prefix"]
    full = evaluate_minimal_pairs(llama_lm, [word_order], method="full").items[0]
    assert result.items[0].good_logprob == pytest.approx(full.good_logprob, abs=1e-6)
    assert "1 scored in full" in result.summary()


def test_accuracy_and_phenomena_with_a_known_preference(monkeypatch):
    """A stub scorer preferring shorter sentences: log p = -len(sentence)."""

    def fake(lm, sentences, batch_size=16, progress=False):
        return [-float(len(s)) for s in sentences], "eos"

    monkeypatch.setattr(pairs_module, "sentence_logprobs", fake)
    pairs = [
        MinimalPair("ab", "abc", uid="u1", linguistics_term="t1"),  # right
        MinimalPair("abcd", "ab", uid="u1", linguistics_term="t1"),  # wrong
        MinimalPair("a", "ab", uid="u2", linguistics_term="t1"),  # right
        MinimalPair("ab", "cd", uid="u3", linguistics_term="t2"),  # tie: wrong
    ]
    result = evaluate_minimal_pairs(object(), pairs)
    assert result.accuracy == 0.5 and result.n == 4
    assert result.by_uid == {
        "u1": {"accuracy": 0.5, "n": 2},
        "u2": {"accuracy": 1.0, "n": 1},
        "u3": {"accuracy": 0.0, "n": 1},
    }
    assert result.by_term == {"t1": {"accuracy": 2 / 3, "n": 3}, "t2": {"accuracy": 0.0, "n": 1}}
    assert [i.diff for i in result.items] == [1.0, -2.0, 1.0, 0.0]
    assert result.rows() == [("t1", 2 / 3, 3), ("t2", 0.0, 1)]
    json.dumps(result.to_dict())


def test_bias_score_with_a_known_preference(monkeypatch):
    def fake(lm, sentences, batch_size=16, progress=False):
        return [-float(len(s)) for s in sentences], "eos"

    monkeypatch.setattr(pairs_module, "sentence_logprobs", fake)
    pairs = [
        BiasPair("ab", "abc", "stereo", "gender"),  # prefers more
        BiasPair("abcd", "ab", "stereo", "gender"),  # prefers less
        BiasPair("a", "abcd", "antistereo", "age"),  # prefers more
        BiasPair("ab", "cd", "stereo", "age"),  # tie: not more
    ]
    result = bias_score(object(), pairs)
    assert result.pct_stereotype == 50.0 and result.ties == 1
    assert result.likelihood_diff == pytest.approx((1 + 2 + 3 + 0) / 4)
    assert result.by_bias_type == {
        "age": {"pct_stereotype": 50.0, "n": 2},
        "gender": {"pct_stereotype": 50.0, "n": 2},
    }
    assert result.by_direction["antistereo"] == {"pct_stereotype": 100.0, "n": 1}
    assert "50.0% of 4 pairs" in result.summary()
    json.dumps(result.to_dict())


def test_bad_arguments_are_errors(char_lm):
    with pytest.raises(ConfigError, match="method='two' is invalid; valid: full, prefix"):
        evaluate_minimal_pairs(char_lm, [MinimalPair("a b.", "b a.")], method="two")
    with pytest.raises(DataError, match="no minimal pairs"):
        evaluate_minimal_pairs(char_lm, [])
    with pytest.raises(DataError, match="single token"):
        sentence_logprobs(char_lm, ["a"])


# ----------------------------------------------------------------------------- end to end


def test_runs_end_to_end_on_a_tiny_model_and_an_ngram(llama_lm):
    torch.manual_seed(0)
    text = " ".join(p.good for p in read_minimal_pairs()).encode()
    ngram = NGramLM(NGramConfig(vocab_size=256, order=3)).fit(np.frombuffer(text, np.uint8))
    for lm in (llama_lm, LM(ngram, ByteTokenizer())):
        full = evaluate_minimal_pairs(lm)
        prefix = evaluate_minimal_pairs(lm, method="prefix")
        bias = bias_score(lm)
        assert full.n == prefix.n == 48 and 0 <= full.accuracy <= 1
        assert prefix.fallbacks == sum(i.method == "full" for i in prefix.items) > 0
        assert 0 <= bias.pct_stereotype <= 100 and bias.n == 20
        for result in (full, prefix, bias):
            json.dumps(result.to_dict())


def test_pairs_a_character_vocabulary_cannot_encode_are_skipped_and_counted(char_lm):
    """char_lm's vocabulary has no quote mark: pairs that use one are skipped."""
    good = MinimalPair("The cats sleep.", "The cats sleeps.", source="x.jsonl:1")
    odd = MinimalPair('The "cats" sleep.', 'The "cats" sleeps.', source="x.jsonl:2")
    result = evaluate_minimal_pairs(char_lm, [good, odd])
    assert result.n == 1 and result.skipped[0].startswith("x.jsonl:2: ")
    assert "1 skipped" in result.summary()
    more = BiasPair("The old man is slow.", "The young man is slow.", "stereo", "age", "b.csv:2")
    quoted = BiasPair('He said "no".', 'She said "no".', "stereo", "gender", "b.csv:3")
    bias = bias_score(char_lm, [more, quoted])
    assert bias.n == 1 and bias.skipped[0].startswith("b.csv:3: ")
    with pytest.raises(DataError, match="encodes none of the 1 bias pairs"):
        bias_score(char_lm, [quoted])
