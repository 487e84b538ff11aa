from lmlab.data.word_problems import KINDS, word_problems
from lmlab.prompting.extract import extract_answer
from lmlab.prompting.sandbox import run_python


def test_every_view_of_a_problem_gives_its_answer():
    problems = word_problems(300, seed=1)
    assert len({p["question"] for p in problems}) == 300
    assert {p["kind"] for p in problems} == set(KINDS)
    for p in problems:
        namespace = {}
        exec(p["program"], namespace)  # our own generated programs, not a model's
        assert str(namespace["solution"]()) == p["answer"], p
        assert extract_answer(p["rationale"], "strict") == p["answer"], p
        assert int(p["answer"]) >= 0


def test_the_same_seed_gives_the_same_problems_and_programs_run_in_the_sandbox():
    assert word_problems(20, seed=3) == word_problems(20, seed=3)
    assert word_problems(20, seed=3) != word_problems(20, seed=4)
    for p in word_problems(2, seed=5):
        assert str(run_python(p["program"]).answer) == p["answer"]
