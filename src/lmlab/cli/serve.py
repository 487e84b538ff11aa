"""``lmlab serve``: an OpenAI-compatible API (and the web playground) over any lmlab model.

    lmlab serve --model smollm2                  # http://127.0.0.1:8000/v1/completions
    lmlab serve --ckpt runs/demo --port 0        # a free port, printed at start
    lmlab serve --model smollm2 --api_key KEY    # or LMLAB_API_KEY=KEY lmlab serve ...

It binds 127.0.0.1 unless told otherwise (``--host 0.0.0.0`` exposes it to the network:
set an API key then). SIGTERM or Ctrl-C stops taking new connections, lets the requests in
flight finish (up to ``--drain_timeout`` seconds), then exits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import sys
import threading

import torch
from jsonargparse import ArgumentParser

from lmlab import api
from lmlab.cli.args import add_model_arguments
from lmlab.errors import ConfigError

API_KEY_ENV = "LMLAB_API_KEY"


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=str | None,
        default=None,
        help="what to serve: a pretrained name (smollm2), a checkpoint or run directory, a "
        "Hugging Face folder or a .gguf file",
    )
    parser.add_argument("--ckpt", type=str | None, default=None, help="same as --model")
    parser.add_argument("--name", type=str | None, default=None, help="model id in the API")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--api_key",
        type=str | None,
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)",
    )
    parser.add_argument("--max_batch", type=int, default=16, help="most sequences decoded together")
    parser.add_argument(
        "--drain_timeout",
        type=float,
        default=60.0,
        help="on SIGTERM/Ctrl-C, seconds to let requests in flight finish",
    )
    parser.add_argument(
        "--threads",
        type=int | None,
        default=None,
        help="CPU threads for the model (torch.set_num_threads); default: torch's",
    )
    parser.add_argument(
        "--check",
        type=bool,
        default=False,
        help="load the model, answer one completion in-process, print it and exit (no socket)",
    )
    add_model_arguments(parser)


def run(args) -> None:
    source = _source(args.model, args.ckpt)
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is invalid: must be in 0..65535 (0: a free port)")
    if args.max_batch < 1:
        raise ConfigError(f"--max_batch {args.max_batch} is invalid: must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} is invalid: must be >= 1")
        torch.set_num_threads(args.threads)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"lmlab serve needs {' and '.join(missing)}: pip install 'lmlab[serve]'")
    from lmlab.serve import create_app  # deferred: needs the optional serve extra

    sock = None if args.check else _bind(args.host, args.port)
    lm = api.load(source, dtype=args.dtype, device=args.device)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(lm, args.name or source, api_key, args.max_batch, _playground())
    if args.check:
        _check(app, api_key)
        return
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(
        f"lmlab: serving {app.state.model_name!r} at http://{where}:{port}/v1"
        f"{' (API key required)' if api_key else ''}",
        file=sys.stderr,
        flush=True,
    )
    if not api_key and host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"lmlab: warning: listening on {host}, beyond this machine, with no API key: "
            "anyone who can reach it can use the model (set --api_key or LMLAB_API_KEY)",
            file=sys.stderr,
        )
    stopped_by = _serve(app, sock, args.drain_timeout)
    print(f"lmlab: server stopped{stopped_by}", file=sys.stderr)


def _serve(app, sock: socket.socket, drain_timeout: float) -> str:
    """Run uvicorn on ``sock`` until SIGINT/SIGTERM, then let the requests in flight
    finish (up to ``drain_timeout`` s); -> " (SIGTERM)", or "" when it stopped otherwise.
    uvicorn re-raises the signal once drained, which would kill the process with it: this
    server returns instead, so the command exits normally."""
    import uvicorn  # deferred: the optional serve extra

    class Server(uvicorn.Server):
        stopped_by = ""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.stop) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def stop(self, sig: int, frame) -> None:
            self.stopped_by = f" ({signal.Signals(sig).name})"
            self.handle_exit(sig, frame)

    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=drain_timeout, lifespan="on"
    )
    server = Server(config)
    server.run(sockets=[sock])
    return server.stopped_by


def _check(app, api_key: str | None) -> None:
    """One greedy completion through the whole app, without a socket."""
    from fastapi.testclient import TestClient  # deferred: the optional serve extra

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0}
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json=body, headers=headers)
    if reply.status_code != 200:
        raise ConfigError(f"the check request failed ({reply.status_code}): {reply.text}")
    print(f"lmlab: check: {body['prompt']!r} -> {reply.json()['choices'][0]['text']!r}")


def _source(model: str | None, ckpt: str | None) -> str:
    if (model is None) == (ckpt is None):
        raise ConfigError(
            "give what to serve with one of --model or --ckpt (a pretrained name such as "
            "smollm2, a checkpoint or run directory, a Hugging Face folder or a .gguf file)"
        )
    return model or ckpt


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), so that port 0 is known before serving."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(128)
    return sock


def _playground() -> list:
    """The playground's routes (its page is served at ``/``)."""
    from lmlab.serve.playground import playground_router  # deferred: fastapi is slow to import

    return [playground_router]
