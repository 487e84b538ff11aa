"""lm-evaluation-harness runs lmlab models: the model class ``lmlab`` for lm-eval (0.4).

lm-eval asks a model three kinds of question (``lm_eval.api.model.LM``); lmlab answers
them with its own code, so the harness's numbers are lmlab's numbers:

- ``loglikelihood``: (context, continuation) -> (summed log-probability, is it greedy),
  by ``lmlab.eval.scoring.score_continuations`` (batched, longest first; the context and
  continuation split as the harness splits them);
- ``loglikelihood_rolling``: a whole text's log-probability after one end-of-document
  token, ``-token_nll([eos] + ids).sum()`` (``lmlab.generate.likelihood``: sliding
  windows, every token scored once);
- ``generate_until``: ``lmlab.generate`` on batches of prompts that share their settings,
  cut at the first ``until`` string (greedy unless ``do_sample``).

lm-eval finds a model class only in its own registry and has no plugin entry point for
models (0.4.13), so the plain ``lm_eval`` command cannot see this one. Importing this
module registers it; running it hands its arguments to lm-eval's own command line::

    python -m lmlab.eval.harness --model lmlab --model_args path=runs/gpt \\
        --tasks hellaswag --batch_size 16 --device cpu

or from Python: ``import lmlab.eval.harness`` then ``lm_eval.simple_evaluate(model="lmlab",
model_args="path=runs/gpt", ...)``. ``model_args``: ``path`` (anything ``lmlab.load``
takes: a run, a checkpoint, an HF folder, a .gguf, "smollm2"), ``dtype`` (float32,
bfloat16, auto; default: as saved), ``max_gen_toks`` (256).

lm-eval is a development dependency only: nothing in lmlab imports this module, and
``lmlab`` imports without lm-eval installed. The test (``tests/eval/test_harness.py``)
runs ``lm_eval.simple_evaluate`` with this class on a bundled task and compares every
log-likelihood with ``lmlab eval``'s.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models, before ours: see below)
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from lmlab.devices import resolve_device
from lmlab.errors import ConfigError
from lmlab.eval.scoring import score_continuations
from lmlab.generate.likelihood import token_nll
from lmlab.lm import LM, load

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


# lm-eval fills its model registry (hf, local-completions, ...) on the first lookup only
# when the registry is empty: registering "lmlab" into an empty one would hide them all
# for the rest of the process, so lm_eval.models is imported above, first.
@register_model("lmlab")
class LMLabHarness(HarnessLM):
    """An lmlab model (``lmlab.LM``) as lm-evaluation-harness's ``LM``.

    ``path``: anything ``lmlab.load`` takes, or ``lm``: an already loaded ``lmlab.LM``.
    ``batch_size``: requests per forward pass ("auto" is taken as 16, lmlab's default).
    """

    def __init__(
        self,
        path: str | None = None,
        lm: LM | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size: int | None = None,
        **unused: Any,
    ):
        super().__init__()
        if unused:
            keys = ", ".join(sorted(unused))
            raise ConfigError(
                f"unknown model_args for the lmlab model: {keys}; valid: path, dtype, "
                "device, batch_size, max_gen_toks"
            )
        if (path is None) == (lm is None):
            raise ConfigError(
                "the lmlab model for lm-eval needs one of path=... (a run, checkpoint, HF "
                "folder, .gguf or pretrained name) or lm=... (a loaded lmlab.LM)"
            )
        self.lm = lm if lm is not None else load(path, dtype=dtype, device=_device(device))
        if self.lm.tokenizer is None:
            raise ConfigError(f"model {path!r} has no tokenizer: lm-eval sends text")
        self.name = str(path) if path is not None else "lmlab.LM"
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        scored = score_continuations(
            self.lm, pairs, batch_size=self.batch_size, progress=not disable_tqdm
        )
        out = []
        for pair, s in zip(pairs, scored):
            answer = (s.logprob, s.is_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        eos = self.lm.tokenizer.eos_id
        if eos is None:
            raise ConfigError(
                f"{self.name}: rolling log-likelihoods (perplexity tasks) score a text's "
                "first token after an end-of-document token, and this tokenizer has none"
            )
        out = []
        for r in tqdm(requests, desc="rolling", disable=disable_tqdm, leave=False):
            (text,) = r.args
            ids = [eos] + self.lm.tokenizer.encode(text)
            nll = token_nll(self.lm.model, ids, batch_size=self.batch_size, progress=False)
            logprob = -float(nll.double().sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            out.append(logprob)
        return out

    # ------------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same settings, in the order given back."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm, leave=False)
        for indices in groups.values():
            decoding = self.decoding(requests[indices[0]].args[1])
            for b in range(0, len(indices), self.batch_size):
                chunk = indices[b : b + self.batch_size]
                texts = self.lm.generate([requests[i].args[0] for i in chunk], **decoding)
                for i, text in zip(chunk, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def decoding(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """lm-eval's generation settings as ``SamplingParams`` fields: ``until`` -> stop,
        ``max_gen_toks`` -> max_new_tokens, greedy unless ``do_sample`` with a temperature
        > 0. A prompt longer than the context keeps its last tokens, as the harness does."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1)) > 0
        decoding: dict[str, Any] = {
            "max_new_tokens": int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
            "stop": until,
            "truncate_prompt": True,
            "temperature": float(kwargs.pop("temperature", 1.0)) if sample else 0.0,
        }
        if sample:
            for name in ("top_p", "top_k", "seed"):
                if name in kwargs:
                    decoding[name] = kwargs.pop(name)
        return decoding

    # ------------------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = self.lm.chat_template
        return template.source if chat_template and template is not None else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.lm.chat_template is None:
            raise ConfigError(f"{self.name} has no chat template: drop --apply_chat_template")
        return self.lm.chat_template.render(
            chat_history, add_generation_prompt=add_generation_prompt
        )


def _device(device: str | None) -> str:
    """lm-eval's ``--device`` (its command line gives "cuda:0" unless told otherwise), or
    "auto" with a warning when this machine has no such device, as lm-eval's HFLM does."""
    if device is None:
        return "auto"
    try:
        resolve_device(device)
    except ConfigError as e:
        log.warning("%s; using device=auto instead", e)
        return "auto"
    return device


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line, with the ``lmlab`` model registered."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
