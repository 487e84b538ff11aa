"""``lmlab chat``: talk to an instruction-tuned model in the terminal, or script one reply.

Three ways to run it:

- interactive (stdin is a terminal, no ``--message``): type a message at the ``> ``
  prompt, the reply streams back; ``/reset`` forgets the conversation (the system prompt
  stays), ``/exit`` or Ctrl-D quits, Ctrl-C during a reply stops it and drops that turn;
- one-shot: ``--message "..."`` prints the reply and exits; repeat ``--message`` for a
  multi-turn conversation, each reply printed on its own line(s) in order;
- piped: with no ``--message`` and stdin not a terminal (``echo hi | lmlab chat ...``),
  the whole of stdin is one message.

In the one-shot and piped modes stdout holds only the replies, so scripts can capture it.
"""

from __future__ import annotations

import dataclasses
import sys

from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.cli.generate import note_compiled
from lmlab.errors import ConfigError, LMLabError
from lmlab.generate import SamplingParams
from lmlab.generate.chat import ChatSession

PROMPT = "> "
COMMANDS = ("/reset", "/exit")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="a model lmlab.load takes: a checkpoint or run directory, or a pretrained name",
    )
    parser.add_argument("--system", type=str | None, default=None, help="the system prompt")
    parser.add_argument(
        "--message",
        type=str,
        action="append",
        default=None,
        help="one-shot mode: print the reply to this message and exit (repeat for several "
        "turns); without it, chat interactively (or read stdin as one message when piped)",
    )
    add_model_arguments(parser)
    parser.add_class_arguments(SamplingParams, nested_key=None)


def run(args) -> None:
    lm = api.load(args.model, dtype=args.dtype, device=args.device)
    if lm.chat_template is None:
        raise ConfigError(
            f"model {args.model!r} has no chat template: lmlab chat needs an instruction-tuned "
            "model that ships one (e.g. smollm2); use lmlab generate to continue plain text"
        )
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    params = SamplingParams.from_dict({k: v for k, v in vars(args).items() if k in names})
    chat = ChatSession(lm, system=args.system, params=params)
    if args.message:
        for message in args.message:
            _answer(chat, message)
    elif not sys.stdin.isatty():
        _answer(chat, sys.stdin.read())
    else:
        _interactive(chat)


def _answer(chat: ChatSession, message: str) -> None:
    for piece in chat.send(message):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    note_compiled(chat.compile_seconds)


def _interactive(chat: ChatSession) -> None:
    print(f"chatting ({', '.join(COMMANDS)}, Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
            continue
        try:
            _answer(chat, line)
        except KeyboardInterrupt:
            print("\n(reply stopped; that turn is dropped)", file=sys.stderr)
        except LMLabError as e:  # e.g. the conversation outgrew the context: /reset helps
            print(f"lmlab: error: {e}", file=sys.stderr)
