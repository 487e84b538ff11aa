"""Evaluation: perplexity and surprisal, text metrics, generation tasks.

Usage, with ``lm = lmlab.load(...)``::

    from lmlab.eval import evaluate_generation, surprisal

    result = evaluate_generation(lm, "uppercase_mini")  # a bundled task or a JSONL file
    result.scores  # {"exact_match": ..., "bleu": ..., "rougeL": ...}
    surprisal(lm, "To be, or not to be").bits_per_byte
"""

from lmlab.eval.behaviour import (
    DIR,
    INV,
    MFT,
    Generate,
    Labels,
    Suite,
    SuiteResult,
    default_suite,
    run_suite,
)
from lmlab.eval.calibration import calibration, reliability_diagram
from lmlab.eval.choice import ChoiceResult, evaluate_choice
from lmlab.eval.generation import (
    GENERATION_TASKS,
    GenerationExample,
    GenerationResult,
    GenerationRow,
    evaluate_generation,
    load_generation_task,
)
from lmlab.eval.pairs import (
    BiasPair,
    BiasResult,
    MinimalPair,
    MinimalPairsResult,
    bias_score,
    evaluate_minimal_pairs,
    read_bias_pairs,
    read_minimal_pairs,
)
from lmlab.eval.perplexity import (
    Surprisal,
    TokenSurprisal,
    bits_per_byte,
    bits_per_character,
    perplexity,
    plot_surprisal,
    surprisal,
    token_nll,
)
from lmlab.eval.robustness import RobustnessResult, evaluate_robustness
from lmlab.eval.run import TaskRun, evaluate, run_task
from lmlab.eval.tasks import ChoiceTask, list_tasks, load_task
from lmlab.eval.text import (
    Score,
    bleu,
    chrf,
    exact_match,
    normalize_answer,
    rouge,
    sentence_bleu,
    sentence_chrf,
    text_scores,
    token_f1,
)

__all__ = [
    "BiasPair",
    "BiasResult",
    "ChoiceResult",
    "ChoiceTask",
    "DIR",
    "GENERATION_TASKS",
    "Generate",
    "GenerationExample",
    "GenerationResult",
    "GenerationRow",
    "INV",
    "Labels",
    "MFT",
    "MinimalPair",
    "MinimalPairsResult",
    "RobustnessResult",
    "Score",
    "Suite",
    "SuiteResult",
    "Surprisal",
    "TaskRun",
    "TokenSurprisal",
    "bias_score",
    "bits_per_byte",
    "bits_per_character",
    "bleu",
    "calibration",
    "chrf",
    "default_suite",
    "evaluate",
    "evaluate_choice",
    "evaluate_generation",
    "evaluate_minimal_pairs",
    "evaluate_robustness",
    "exact_match",
    "list_tasks",
    "load_generation_task",
    "load_task",
    "normalize_answer",
    "perplexity",
    "plot_surprisal",
    "read_bias_pairs",
    "read_minimal_pairs",
    "reliability_diagram",
    "rouge",
    "run_suite",
    "run_task",
    "sentence_bleu",
    "sentence_chrf",
    "surprisal",
    "text_scores",
    "token_f1",
    "token_nll",
]
