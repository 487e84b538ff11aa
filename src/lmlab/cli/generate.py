"""``lmlab generate``: continue a prompt with a trained model, with any decoding method.

The text goes to stdout; a note on stderr says when the prompt was cut to fit the model's
context (``--truncate_prompt true``), when the text outgrew the context, so that the
window slid and the oldest tokens dropped out of view, and how long compiling the decoding
step took (``--compile true``).
"""

from __future__ import annotations

import dataclasses
import sys

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.generate import SamplingParams, generate
from lmlab.generate.compiled import step_cache_dir


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument("prompt", type=str, help="the text to continue")
    parser.add_argument(
        "--ckpt",
        "--model",
        type=str,
        default="runs/demo",
        help="checkpoint or run directory, or a pretrained name (smollm2); --model is the same",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--no_stream", type=bool, default=False, help="print the text only when done"
    )
    parser.add_class_arguments(SamplingParams, nested_key=None)


def run(args) -> None:
    lm = api.load(args.ckpt, dtype=args.dtype, device=args.device)
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    decoding = {k: v for k, v in vars(args).items() if k in names}
    context = getattr(lm.model.config, "max_seq_len", None)
    if decoding["num_beams"] > 1:  # beam search knows its best beam only at the end
        params = SamplingParams.from_dict(decoding)
        result = generate(lm.model, [args.prompt], params, tokenizer=lm.tokenizer)
        _note_truncated(result.truncated[0], context)
        print(args.prompt + result.texts[0])
        _note_slid(result.slid[0], context)
        note_compiled(result.compile_seconds)
        return
    stream = lm.stream(args.prompt, **decoding)
    _note_truncated(stream.truncated, context)
    print(args.prompt, end="", flush=True)
    if args.no_stream:
        sys.stdout.write("".join(stream))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    _note_slid(stream.slid, context)
    note_compiled(stream.compile_seconds)


def _note_truncated(dropped: int, context: int | None) -> None:
    if dropped:
        print(
            f"lmlab: note: the prompt is longer than the model's context of {context} tokens: "
            f"its first {dropped} tokens were dropped (--truncate_prompt)",
            file=sys.stderr,
        )


def _note_slid(slid: int, context: int | None) -> None:
    if slid:
        print(
            f"lmlab: note: the text outgrew the model's context of {context} tokens, so the "
            f"window slid: the {slid} oldest tokens dropped out of view, and each later token "
            f"was predicted from the last {context} alone",
            file=sys.stderr,
        )


def note_compiled(seconds: float) -> None:
    """A note on stderr when this run compiled or loaded the one-token step (``--compile
    true``)."""
    if seconds:
        print(
            f"lmlab: note: compiling (or loading) the decoding step took {seconds:.1f} s, once "
            f"per process and model (compiled steps are kept in {step_cache_dir()} for later "
            "runs)",
            file=sys.stderr,
        )
