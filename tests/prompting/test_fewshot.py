"""In-context learning prompts: selection, order, layout, fitting the context, scoring."""

import pytest
import torch

from lmlab.data.chat import ChatTemplate
from lmlab.errors import ConfigError
from lmlab.eval.choice import build_prompt, evaluate_choice
from lmlab.eval.tasks import load_task
from lmlab.prompting.fewshot import (
    FORMATS,
    evaluate_icl,
    fit_prompt,
    order_examples,
    render_prompt,
    select_examples,
    shot_format,
)
from prompting.test_models import byte_lm


@pytest.fixture(scope="module")
def task():
    return load_task("sentiment")


def test_the_tasks_own_format_renders_as_lmlab_eval_does(task):
    item = task.items[0]
    examples = select_examples(task.items, item, 3, seed=1)
    prompt, conts = render_prompt(item, examples, shot_format(task, "task"))
    assert prompt == build_prompt(task, item, examples)
    assert conts == [" negative", " positive"]


def test_selection_is_seeded_excludes_the_question_and_balances_answers(task):
    item = task.items[5]
    a = select_examples(task.items, item, 6, "random", seed=2)
    assert a == select_examples(task.items, item, 6, "random", seed=2) and item not in a
    assert a != select_examples(task.items, item, 6, "random", seed=3)
    balanced = select_examples(task.items, item, 6, "balanced", seed=2)
    assert sorted(ex.gold for ex in balanced) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="k=99 is invalid"):
        select_examples(task.items, item, 99)


def test_nearest_takes_the_most_similar_and_nearest_last_puts_it_by_the_question(task):
    item = task.items[0]
    words = item.query.split()

    def embed(texts):  # similarity = shared words with the question
        vecs = torch.tensor([[float(w in t.split()) for w in words] + [1.0] for t in texts])
        return vecs / vecs.norm(dim=1, keepdim=True)

    chosen = select_examples(task.items, item, 3, "nearest", embed=embed)
    sims = [len(set(words) & set(ex.query.split())) for ex in task.items if ex is not item]
    assert [len(set(words) & set(ex.query.split())) for ex in chosen][0] == max(sims)
    assert order_examples(chosen, "nearest_last") == chosen[::-1]
    with pytest.raises(ConfigError, match="needs an embed function"):
        select_examples(task.items, item, 3, "nearest")


def test_a_prompt_too_long_drops_the_farthest_examples_or_says_why(task):
    lm = byte_lm()
    item = task.items[0]
    examples = select_examples(task.items, item, 8, seed=0)
    full = fit_prompt(lm, item, examples, FORMATS["qa"], max_tokens=10_000)
    assert full.dropped == 0
    limit = len(lm.tokenizer.encode(full.prompt)) // 2
    fitted = fit_prompt(lm, item, examples, FORMATS["qa"], max_tokens=limit)
    assert 0 < fitted.dropped < 8 and fitted.examples == examples[fitted.dropped :]
    assert len(lm.tokenizer.encode(fitted.prompt + fitted.continuations[0])) <= limit
    with pytest.raises(ConfigError, match="more than the model's context"):
        fit_prompt(lm, item, examples, FORMATS["qa"], max_tokens=limit, on_overflow="error")


def test_zero_shot_icl_scores_exactly_as_lmlab_eval(task):
    lm = byte_lm()
    ours = evaluate_icl(lm, task, k=0, fmt="task")
    theirs = evaluate_choice(lm, task, num_fewshot=0, progress=False)
    assert ours.correct == [r.correct["acc"] for r in theirs.items]
    three = evaluate_icl(lm, task, k=3, fmt="qa", seed=1)
    assert three.n == len(task.items) and 0 <= three.accuracy <= 1


def test_the_chat_layout_uses_the_models_template(task):
    lm = byte_lm()
    item, examples = task.items[0], task.items[1:3]
    with pytest.raises(ConfigError, match="needs a model with a chat template"):
        render_prompt(item, examples, layout="chat", lm=lm)
    lm.chat_template = ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt, conts = render_prompt(item, examples, layout="chat", lm=lm)
    assert prompt.count("<user>") == 3 and prompt.count("<assistant>") == 3
    assert prompt.endswith("<assistant>") and conts == ["negative", "positive"]
