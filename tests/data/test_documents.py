"""The generated world: deterministic, consistent, and every question needs two hops."""

import collections

from lmlab.data.documents import build_world, documents, example_questions, multihop_questions


def test_the_same_seed_gives_the_same_world_and_another_seed_another():
    assert documents(seed=0) == documents(seed=0)
    assert multihop_questions(seed=0) == multihop_questions(seed=0)
    assert documents(seed=1) != documents(seed=0)


def test_the_collection_and_the_question_set_are_large_enough_and_varied():
    docs = documents()
    kinds = collections.Counter(d.kind for d in docs)
    assert set(kinds) == {"person", "city", "country", "river", "distractor"}
    assert kinds["distractor"] >= 10 and len({d.title for d in docs}) == len(docs)
    items = multihop_questions()
    assert len(items) >= 100 and len({q["question"] for q in items}) == len(items)
    assert {q["kind"] for q in items} == {
        "birth_country",
        "birth_capital",
        "birth_river",
        "work_currency",
    }
    assert multihop_questions(10) == items[:10]


def test_facts_agree_and_no_page_states_an_answer_beside_its_question():
    world = build_world(0)
    for p in world.people:
        page = next(d for d in world.documents if d.title == p["name"])
        assert f"born in {p['born']}" in page.text and p["born"] != p["worked"]
        country = world.cities[p["born"]]["country"]
        assert country not in page.text  # the country needs a second hop
    for c in world.cities.values():
        assert c["name"] in world.countries[c["country"]]["cities"]
        if c["river"]:
            assert c["name"] in world.rivers[c["river"]]["through"]


def test_example_questions_are_not_in_the_question_set():
    examples = example_questions()
    asked = {q["question"] for q in multihop_questions()}
    assert len(examples) == 2 and not {e["question"] for e in examples} & asked
