"""Prompting and agents: model-written code runs in ``lmlab.prompting.sandbox``."""

from lmlab.prompting.sandbox import Limits, SandboxResult, run_python

__all__ = ["Limits", "SandboxResult", "run_python"]
