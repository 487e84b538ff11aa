"""Serving: an OpenAI-compatible HTTP API over any lmlab model, with continuous batching.

    lmlab serve --model smollm2                 # http://127.0.0.1:8000/v1/...
    lmlab serve --ckpt runs/demo --port 0 --api_key KEY

or from Python::

    import uvicorn
    from lmlab import load
    from lmlab.serve import create_app

    uvicorn.run(create_app(load("smollm2"), name="smollm2"), host="127.0.0.1", port=8000)

- ``app.py``: the routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
  SSE streaming, ``/health``, ``/tokenize``, ``/detokenize``, ``/tokenizer_info``), request
  checks through the library's own validator, OpenAI's error object for every failure;
- ``protocol.py``: the request bodies (pydantic) and the error object;
- ``engine.py``: continuous batching: one thread owns the model, requests join the running
  batch at the next step and leave when done, a KV cache row per sequence.

The interface for code that adds routes (the web playground): ``create_app(lm, routers=
[...])`` includes each ``APIRouter`` (or calls ``f(app.state)`` to make one) behind the
same API key, and serves the page ``serve/static/index.html`` at ``/`` (a redirect to
``/static/index.html``; the folder is mounted at ``/static``) when it exists.
``app.state`` holds:

    lm          the loaded model handle (``lmlab.LM``: .model, .tokenizer, .chat_template)
    tokenizer   lm.tokenizer (encode, decode, eos_id)
    engine      the batching ``Engine`` (submit(Job), cancel(job), active, stats); a router
                that runs the model directly should not race it on a GPU (CPU is safe)
    model_name  the id in /v1/models; context: max_seq_len (None: unbounded); vocab_size
    api_key     None or the key

Nothing in lmlab imports this package (DESIGN.md: serve/ and cli/ are at the top).
"""

from lmlab.serve.app import create_app
from lmlab.serve.engine import Engine, Job

__all__ = ["Engine", "Job", "create_app"]
