import json

import pytest

from lmlab.api import LM
from lmlab.data import CharTokenizer
from lmlab.data.chat import ChatTemplate
from lmlab.errors import ConfigError, DataError, DataNotFoundError, DecodingError
from lmlab.eval.generation import (
    GENERATION_TASKS,
    GenerationRow,
    build_prompt,
    evaluate_generation,
    load_generation_task,
    row_from_dict,
)
from lmlab.models import build_model, get_preset

ROWS = load_generation_task("uppercase_mini")


def tiny_lm(max_seq_len=96):
    text = "".join(r.prompt + " " + r.references[0] + "\n" for r in ROWS)
    tok = CharTokenizer.train(text)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": tok.vocab_size, "d_model": 32}
    spec = {**spec, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": max_seq_len}
    return LM(build_model(spec).eval(), tok)


def test_bundled_task_is_lowercase_phrases_and_their_capitals():
    assert set(GENERATION_TASKS) == {"uppercase_mini"}
    assert len(ROWS) == 32 and len({r.prompt for r in ROWS}) == 32
    for row in ROWS:
        assert row.prompt.startswith("Lowercase: ") and row.prompt.endswith("\nUppercase:")
        phrase = row.prompt.removeprefix("Lowercase: ").removesuffix("\nUppercase:")
        assert phrase == phrase.lower() and row.references == (phrase.upper(),)
        assert row.id.startswith("upper-") and row.source.endswith(f":{int(row.id[6:]) + 1}")


def test_tiny_model_gives_one_output_per_row_deterministically():
    """Greedy decoding: the same outputs batched or one row at a time, and each equals a
    direct ``lm.generate`` call cut at the first newline."""
    lm = tiny_lm()
    rows = ROWS[:3]  # batches of 2 and 1: the first is padded (prompts of unequal length)
    result = evaluate_generation(lm, rows, max_new_tokens=8, batch_size=2, progress=False)
    assert len(result.examples) == 3
    assert [e.prompt for e in result.examples] == [r.prompt for r in rows]
    for name in ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL"):
        assert 0.0 <= result.scores[name] <= 1.0
    assert 0.0 <= result.scores["bleu"] <= 100.0 and 0.0 <= result.scores["chrf"] <= 100.0
    alone = evaluate_generation(lm, rows, max_new_tokens=8, batch_size=1, progress=False)
    assert alone.outputs == result.outputs and alone.scores == result.scores
    direct = [lm.generate(r.prompt, max_new_tokens=8, temperature=0, stop=["\n"]) for r in rows]
    assert result.outputs == [d.strip() for d in direct]
    assert all("\n" not in out for out in result.outputs)
    json.dumps(result.to_dict())  # a report can hold it


def fake_generate(lm, answers, calls):
    """Make ``lm.generate`` answer each prompt from ``answers`` (prompt -> text), with the
    whitespace a model writes after "Uppercase:"; records every call."""

    def generate(prompts, **decoding):
        calls.append((list(prompts), decoding))
        return [" " + answers[p] + " " for p in prompts]

    lm.generate = generate


def test_a_model_that_writes_the_references_scores_perfectly():
    lm, calls = tiny_lm(), []
    fake_generate(lm, {r.prompt: r.references[0] for r in ROWS}, calls)
    result = evaluate_generation(lm, ROWS, max_new_tokens=16, batch_size=10, progress=False)
    assert result.scores["exact_match"] == 1.0 and result.scores["token_f1"] == 1.0
    assert result.scores["bleu"] == pytest.approx(100.0)
    assert result.scores["chrf"] == pytest.approx(100.0)
    assert result.scores["rougeL"] == pytest.approx(1.0)
    assert all(e.exact_match == 1.0 and e.output == e.references[0] for e in result.examples)
    # four batches of at most 10, greedy, stopping at the first newline
    assert [len(prompts) for prompts, _ in calls] == [10, 10, 10, 2]
    assert calls[0][1] == {"temperature": 0.0, "max_new_tokens": 16, "stop": ("\n",)}


def test_a_model_that_writes_something_else_scores_zero_exact_match():
    lm, calls = tiny_lm(), []
    fake_generate(lm, {r.prompt: "no idea" for r in ROWS}, calls)
    result = evaluate_generation(lm, ROWS[:4], metrics=["exact_match", "bleu"], progress=False)
    assert result.scores == {"exact_match": 0.0, "bleu": 0.0}


def test_few_shot_prompts_in_plain_and_chat_layouts():
    shots = [GenerationRow("2+2=", ("4",)), GenerationRow("3+3=", ("6", "six"))]
    row = GenerationRow("4+4=", ("8",))
    assert build_prompt(row, shots) == "2+2= 4\n\n3+3= 6\n\n4+4="
    assert build_prompt(row, shots, target_delimiter="", fewshot_delimiter="\n") == (
        "2+2=4\n3+3=6\n4+4="
    )
    template = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert build_prompt(row, shots[:1], template) == "<user>2+2=<assistant>4<user>4+4=<assistant>"


def test_chat_prompts_use_the_template_and_stop_at_end_of_turn():
    lm, calls = tiny_lm(), []
    with pytest.raises(ConfigError, match="chat=True needs a model with a chat template"):
        evaluate_generation(lm, ROWS[:2], chat=True, progress=False)
    lm.chat_template = ChatTemplate(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    rows, shots = ROWS[1:3], ROWS[:1]
    fake_generate(
        lm,
        {
            f"[user]{shots[0].prompt}[assistant]GOOD MORNING[user]{r.prompt}[assistant]": r.references[
                0
            ]
            for r in rows
        },
        calls,
    )
    result = evaluate_generation(lm, rows, few_shot=shots, chat=True, progress=False)
    assert result.scores["exact_match"] == 1.0
    assert calls[0][1]["stop"] == ()  # the end-of-turn token ends the answer
    assert result.settings["n_shots"] == 1 and result.settings["chat"] is True


def test_malformed_jsonl_names_file_line_and_the_expected_fields(tmp_path):
    file = tmp_path / "task.jsonl"
    good = json.dumps({"prompt": "a", "reference": "A"})
    cases = [
        (
            json.dumps({"prompt": "b"}),
            r":2: missing 'reference' \(or 'references'\); expected 'prompt'",
        ),
        (
            json.dumps({"reference": "B"}),
            r":2: missing 'prompt';.*the line has keys \['reference'\]",
        ),
        (json.dumps({"prompt": "b", "references": "B"}), r":2: 'references' must be a list"),
        (json.dumps({"prompt": "b", "references": []}), r":2: the references must be a non-empty"),
        (json.dumps({"prompt": "", "reference": "B"}), r":2: 'prompt' must be a non-empty string"),
        (json.dumps({"prompt": "b", "reference": 3}), r":2: 'reference' must be a string"),
        ("", r":2: blank line"),
        ("{not json", r":2: invalid JSON"),
        ("[1, 2]", r":2: a line must hold a JSON object, got list; expected 'prompt'"),
    ]
    for line, message in cases:
        file.write_text(good + "\n" + line + "\n" + good + "\n")
        with pytest.raises(DataError, match=f"{file}{message}"):
            load_generation_task(file)
        with pytest.raises(DataError, match=f"{file}{message}"):  # also through evaluation
            evaluate_generation(tiny_lm(), str(file), progress=False)
    with pytest.raises(DataNotFoundError, match="no generation task 'upper_mini'.*uppercase_mini"):
        load_generation_task("upper_mini")
    with pytest.raises(DataError, match="row 1: missing 'prompt'"):
        evaluate_generation(tiny_lm(), [{"prompt": "a", "reference": "A"}, {"ref": "x"}])


def test_several_references_load_from_jsonl(tmp_path):
    file = tmp_path / "task.jsonl"
    file.write_text(
        json.dumps({"id": 7, "prompt": "colour:", "references": ["red", "blue"]}) + "\n"
    )
    (row,) = load_generation_task(file)
    assert row == GenerationRow("colour:", ("red", "blue"), "7", f"{file}:1")
    assert row_from_dict({"prompt": "p", "reference": "r"}).references == ("r",)


def test_bad_settings_fail_before_any_decoding():
    lm, calls = tiny_lm(), []
    fake_generate(lm, {}, calls)
    with pytest.raises(ConfigError, match="unknown metric 'blue'"):
        evaluate_generation(lm, ROWS[:2], metrics=["blue"], progress=False)
    with pytest.raises(DecodingError, match="top_p=2"):
        evaluate_generation(lm, ROWS[:2], top_p=2, progress=False)
    with pytest.raises(ConfigError, match="batch_size=0"):
        evaluate_generation(lm, ROWS[:2], batch_size=0, progress=False)
    with pytest.raises(DataError, match="no rows"):
        evaluate_generation(lm, [], progress=False)
    assert calls == []
