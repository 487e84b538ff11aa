"""Evaluation: perplexity and surprisal (more metrics arrive with the evaluation issue)."""

from lmlab.eval.perplexity import perplexity, token_nll

__all__ = ["perplexity", "token_nll"]
