"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021).

Both keep the whole model frozen and learn a few vectors that every input sees.

Prompt tuning learns n "virtual token" embeddings P [n, D], prepended to the embeddings of
every input: the model reads [P; E(ids)] and the logits of the real tokens are returned.
The virtual tokens take the first n positions, so they count toward the context window:
the wrapper's ``config.max_seq_len`` is the base model's minus n. P starts as the
embeddings of vocabulary rows: those of a given text (``init_ids``, like the paper's
"class label" initialisation) or random ones (its "sampled vocab").

Prefix tuning learns, for every layer, n keys and n values per key/value head that every
position attends to, as if an n-token prefix had been run through the model; unlike prompt
tuning it steers every layer directly. The prefix is learned directly, or through a
reparameterisation (section 4.3 of the paper) P = MLP(P') with a small P' [n, D] and a
two-layer tanh MLP, which trains more stably; either way it starts from the keys and
values the frozen model computes for n random tokens (direct) or from the MLP's output.
The prefix has no position: real tokens keep positions 0, 1, ..., so it does not shorten
the context window (it does take n slots of the KV cache).

Implementation, without touching the model file. Prompt tuning feeds n placeholder ids
in front of the input and replaces their embeddings through the ``hook_embed`` hook point
for the duration of the call. Prefix tuning hands the model a KV cache whose first n slots
hold the prefix (gradients flow into it through the cache writes), marked so that the
model takes positions from the cache's own counter, which starts at 0.

Both wrappers take and return what an lmlab model does, ``forward(ids [B, T], cache=None,
mask=None) -> logits [B, T, V]``, and provide ``new_cache`` and ``config``, so
``lmlab.generate`` decodes with them, KV cache included.

    >>> spec = {**get_preset("gpt-char-tiny"), "vocab_size": 65}   # D = 192, 4 blocks
    >>> tuned = PromptTuning(build_model(spec), n_tokens=20)   # the model is frozen in place
    >>> tuned(torch.zeros(2, 10, dtype=torch.long)).shape      # logits of the real tokens
    torch.Size([2, 10, 65])
    >>> describe_trainable(tuned), tuned.config.max_seq_len   # 20 x D = 192; 128 - 20
    ('trainable 3,840 of 1,820,736 parameters (0.21%)', 108)
    >>> describe_trainable(PrefixTuning(build_model(spec), n_tokens=10))  # 4 x (k, v) x 10 x 192
    'trainable 15,360 of 1,832,256 parameters (0.84%)'

Tests: tests/finetune/test_prompts.py (only the new vectors get gradients; a few steps lower
a toy loss; cached decoding equals full recomputation).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmlab.errors import ConfigError


def _check_model(model: nn.Module, what: str) -> None:
    for attr in ("tok_emb", "hook_embed", "new_cache", "blocks"):
        if not hasattr(model, attr):
            raise ConfigError(
                f"{what} needs an lmlab transformer (tok_emb, hook_embed, new_cache); "
                f"{type(model).__name__} has no {attr}"
            )


class PromptTuning(nn.Module):
    """A frozen lmlab transformer reading ``n_tokens`` trainable embeddings before its input.

    model: frozen in place; n_tokens: number of virtual tokens (ignored when ``init_ids``
    is given and n_tokens is None); init_ids: token ids whose embeddings start the prompt
    (repeated or cut to n_tokens), e.g. ``tokenizer.encode("Classify the sentiment:")``;
    None takes random vocabulary rows.
    """

    def __init__(
        self, model: nn.Module, n_tokens: int | None = 20, init_ids: list[int] | None = None
    ):
        super().__init__()
        _check_model(model, "prompt tuning")
        n = n_tokens if n_tokens is not None else len(init_ids or [])
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n_tokens={n_tokens!r} is invalid: must be a positive integer")
        context = model.config.max_seq_len
        if n >= context:
            raise ConfigError(
                f"n_tokens={n} leaves no room for input in the model's context of {context} "
                "tokens (max_seq_len); the virtual tokens count toward it"
            )
        vocab = model.config.vocab_size
        if init_ids is not None:
            if not init_ids or not all(0 <= int(i) < vocab for i in init_ids):
                raise ConfigError(f"init_ids must be a non-empty list of ids in 0..{vocab - 1}")
            rows = torch.tensor([init_ids[i % len(init_ids)] for i in range(n)])
        else:
            rows = torch.randint(0, vocab, (n,))
        self.model = model.requires_grad_(False)
        embedding = model.tok_emb.weight
        self.prompt = nn.Parameter(embedding[rows.to(embedding.device)].detach().clone())  # (n, D)

    @property
    def n_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def wrapped(self) -> nn.Module:
        """The model inside (the model contract's way to find its family)."""
        return self.model

    @property
    def config(self):
        """The base model's config with the room the virtual tokens take out of max_seq_len."""
        base = self.model.config
        return dataclasses.replace(base, max_seq_len=base.max_seq_len - self.n_tokens)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None):
        """A KV cache for ``max_len`` real tokens (default: all that fit) and the prompt."""
        max_len = max_len or self.config.max_seq_len
        return self.model.new_cache(batch_size, self.n_tokens + max_len, dtype)

    def forward(
        self,
        ids: torch.Tensor,
        cache=None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids: [B, T] int64; mask: [B, T] bool (False on left padding) -> logits [B, T, V].

        With a cache, the first call (an empty cache) feeds the virtual tokens too; later
        calls continue after them.
        """
        B, T = ids.shape
        n = self.n_tokens
        if cache is not None and cache.length > 0:  # decoding: the prompt is in the cache
            used = cache.length - n
            if used + T > self.config.max_seq_len:
                raise ConfigError(
                    f"sequence of {used + T} tokens exceeds the context of "
                    f"{self.config.max_seq_len} tokens left beside {n} virtual tokens"
                )
            return self.model(ids, cache=cache, mask=mask)
        if T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {T} tokens exceeds the context of {self.config.max_seq_len} "
                f"tokens left beside {n} virtual tokens (max_seq_len "
                f"{self.model.config.max_seq_len})"
            )
        placeholders = ids.new_zeros(B, n)  # their embeddings are replaced by the prompt
        if mask is not None:
            mask = torch.cat([mask.new_ones(B, n), mask.to(torch.bool)], dim=1)  # (B, n + T)

        def prepend_prompt(module, args, embeddings):  # (B, n + T, D)
            prompt = self.prompt.to(embeddings.dtype).expand(B, -1, -1)  # (B, n, D)
            return torch.cat([prompt, embeddings[:, n:]], dim=1)

        handle = self.model.hook_embed.register_forward_hook(prepend_prompt)
        try:
            logits = self.model(torch.cat([placeholders, ids], dim=1), cache=cache, mask=mask)
        finally:
            handle.remove()
        return logits[:, n:]  # (B, T, V): the real tokens only


class PrefixTuning(nn.Module):
    """A frozen lmlab transformer whose every layer also attends to n trainable key/value slots.

    model: frozen in place; n_tokens: prefix length; hidden: width of the
    reparameterisation MLP (Li & Liang use 512 to 800), None to learn the prefix directly.
    """

    def __init__(self, model: nn.Module, n_tokens: int = 10, hidden: int | None = None):
        super().__init__()
        _check_model(model, "prefix tuning")
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise ConfigError(f"n_tokens={n_tokens!r} is invalid: must be a positive integer")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ConfigError(f"hidden={hidden!r} is invalid: must be a positive integer or None")
        self.model = model.requires_grad_(False)
        self.n_tokens = n_tokens
        cfg = model.config
        self._shape = (cfg.n_layers, 2, cfg.kv_heads, n_tokens, cfg.head_size)  # (L, 2, Hkv, n, Dh)
        weight = model.tok_emb.weight
        if hidden is None:
            self.prefix = nn.Parameter(self._model_keys_values(n_tokens))
            self.embedding = self.mlp = None
        else:
            self.prefix = None
            L, _, Hkv, _, Dh = self._shape
            self.embedding = nn.Parameter(torch.randn(n_tokens, cfg.d_model) * cfg.init_std)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, L * 2 * Hkv * Dh)
            )
            self.to(device=weight.device, dtype=weight.dtype)

    @property
    def wrapped(self) -> nn.Module:
        """The model inside (the model contract's way to find its family)."""
        return self.model

    @torch.no_grad()
    def _model_keys_values(self, n: int) -> torch.Tensor:
        """Keys and values [L, 2, Hkv, n, Dh] the frozen model computes for n random tokens."""
        was_training = self.model.training
        self.model.eval()
        device = self.model.tok_emb.weight.device
        ids = torch.randint(0, self.model.config.vocab_size, (1, n), device=device)
        cache = self.model.new_cache(1, n)
        self.model(ids, cache=cache)
        self.model.train(was_training)
        return torch.stack([torch.stack([k[0], v[0]]) for k, v in zip(cache.k, cache.v)]).clone()

    @property
    def config(self):
        return self.model.config

    def prefix_keys_values(self) -> torch.Tensor:
        """The prefix: keys and values [L, 2, Hkv, n, Dh] (through the MLP if reparameterised)."""
        if self.mlp is None:
            return self.prefix
        L, _, Hkv, n, Dh = self._shape
        out = self.mlp(self.embedding)  # (n, L * 2 * Hkv * Dh)
        return out.view(n, L, 2, Hkv, Dh).permute(1, 2, 3, 0, 4)  # (L, 2, Hkv, n, Dh)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None):
        """A KV cache for ``max_len`` tokens whose first n slots hold the prefix."""
        n = self.n_tokens
        max_len = max_len or self.config.max_seq_len
        cache = self.model.new_cache(batch_size, n + max_len, dtype)
        prefix = self.prefix_keys_values()
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            k[:, :, :n] = prefix[layer, 0]  # (B, Hkv, n, Dh), broadcast over B
            v[:, :, :n] = prefix[layer, 1]
        cache.valid[:, :n] = True
        cache.length = n
        # "padded" makes the model take positions from next_pos (0 here, so the real tokens
        # start at position 0) and build an explicit mask over the valid slots.
        cache.padded = True
        return cache

    def forward(self, ids: torch.Tensor, cache=None, mask: torch.Tensor | None = None):
        """ids: [B, T] int64; mask: [B, T] bool (False on left padding) -> logits [B, T, V].

        Without a cache, a fresh one holding the prefix is made for this call.
        """
        B, T = ids.shape
        if cache is None:
            cache = self.new_cache(B, T)
        used = cache.length - self.n_tokens
        if used + T > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {used + T} tokens exceeds the context window (max_seq_len) "
                f"{self.config.max_seq_len}"
            )
        return self.model(ids, cache=cache, mask=mask)
