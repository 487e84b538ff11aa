"""Deterministic, resumable batches from a 1-D array of token ids.

The tokens are cut into windows of ``seq_len + 1`` tokens (inputs are the first seq_len,
targets the last seq_len, shifted by one); consecutive windows share one token, so every
token is a target once per epoch::

    tokens   a b c d e f g h i        seq_len = 4, offset = 0
    windows  [a b c d e] [e f g h i]  -> x = a b c d, y = b c d e;  x = e f g h, y = f g h i

Each epoch draws, from a ``torch.Generator`` seeded by ``(seed, epoch)`` alone, a random
offset in ``[0, seq_len)`` (so window boundaries move between epochs) and a permutation of
the windows; batches take the permuted windows in order, and the last incomplete batch of
an epoch is dropped. The position is ``(epoch, index)``, index counting the windows used
in this epoch, so saving those two integers is enough to resume mid-epoch with the same
order, whatever the gradient accumulation. Only the windows of a batch are read, so a
``np.memmap`` larger than memory streams from disk.
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.errors import DataError

Tokens = np.ndarray | torch.Tensor


def _check_tokens(tokens: Tokens, what: str) -> None:
    if not isinstance(tokens, (np.ndarray, torch.Tensor)):
        raise DataError(
            f"{what} must be a 1-D numpy array, np.memmap or torch tensor of token ids, "
            f"got {type(tokens).__name__}"
        )
    dtype = tokens.dtype
    integral = (
        not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
        if isinstance(tokens, torch.Tensor)
        else np.issubdtype(dtype, np.integer)
    )
    if tokens.ndim != 1 or not integral:
        raise DataError(
            f"{what} must be a 1-D array of integer token ids, got shape "
            f"{tuple(tokens.shape)} of {dtype}"
        )


def gather_windows(tokens: Tokens, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``tokens[s : s + length]`` for each start -> [len(starts), length] int64 (CPU)."""
    if isinstance(tokens, torch.Tensor):
        index = starts[:, None] + torch.arange(length)  # (B, L+1)
        return tokens[index.to(tokens.device)].long().cpu()
    index = starts.numpy()[:, None] + np.arange(length)  # (B, L+1)
    # Fancy indexing a memmap reads only the pages these windows lie on.
    return torch.from_numpy(np.asarray(tokens[index]).astype(np.int64))


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct (seed, epoch) pairs give distinct generator seeds (the golden-ratio constant
    # spreads consecutive seeds apart); the result fits torch's seed range.
    return (seed * 0x9E3779B97F4A7C15 + epoch) % (2**63)


class TrainBatches:
    """Shuffled training batches of windows, resumable at ``(epoch, index)``.

    ``next_batch()`` returns ``[batch_size, seq_len + 1]`` int64 on the CPU: the inputs
    are ``[:, :-1]`` and the targets ``[:, 1:]``.
    """

    def __init__(
        self,
        tokens: Tokens,
        batch_size: int,
        seq_len: int,
        seed: int,
        random_offset: bool = True,
    ):
        _check_tokens(tokens, "train tokens")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.random_offset = random_offset
        # Fewest windows over all offsets: offset seq_len - 1 leaves len - seq_len tokens.
        fewest = (len(tokens) - 1 - (seq_len - 1 if random_offset else 0)) // seq_len
        if fewest < batch_size:
            need = batch_size * seq_len + (seq_len if random_offset else 1)
            raise DataError(
                f"train tokens: {len(tokens)} tokens make {max(fewest, 0)} windows of "
                f"seq_len + 1 = {seq_len + 1} tokens, fewer than batch_size={batch_size}; "
                f"give at least {need} tokens or lower seq_len or batch_size"
            )
        self.epoch = 0
        self.index = 0
        self._plan_epoch = -1
        self._offset = 0
        self._order = torch.empty(0, dtype=torch.long)

    def _plan(self, epoch: int) -> None:
        """The offset and window order of ``epoch``, from (seed, epoch) only."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        offset = int(torch.randint(self.seq_len, (1,), generator=g)) if self.random_offset else 0
        n_windows = (len(self.tokens) - 1 - offset) // self.seq_len
        self._offset = offset
        self._order = torch.randperm(n_windows, generator=g)
        self._plan_epoch = epoch

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len + 1]`` int64 windows; advances the position."""
        return gather_windows(self.tokens, self._next_starts(), self.seq_len + 1)

    def skip(self) -> None:
        """Advance past one batch without reading it (another rank's, under torchrun)."""
        self._next_starts()

    def _next_starts(self) -> torch.Tensor:
        """The start offsets of the next batch's windows; advances the position."""
        if self._plan_epoch != self.epoch:
            self._plan(self.epoch)
        if self.index + self.batch_size > len(self._order):  # drop the last partial batch
            self.epoch, self.index = self.epoch + 1, 0
            self._plan(self.epoch)
        picked = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return self._offset + picked * self.seq_len

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("seq_len") != self.seq_len:
            raise DataError(
                f"cannot continue the data order of a run with seed={state.get('seed')}, "
                f"seq_len={state.get('seq_len')} using seed={self.seed}, seq_len={self.seq_len}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def fixed_batches(
    tokens: Tokens, batch_size: int, seq_len: int, n_batches: int
) -> list[torch.Tensor]:
    """Validation batches: the same windows every time, spread evenly over ``tokens``.

    Up to ``n_batches`` batches of ``[batch_size, seq_len + 1]`` int64 (the last one may be
    smaller when there are too few windows).
    """
    _check_tokens(tokens, "validation tokens")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(
            f"validation tokens: {len(tokens)} tokens are fewer than seq_len + 1 = "
            f"{seq_len + 1}; give more validation data or lower seq_len"
        )
    wanted = min(n_windows, batch_size * n_batches)
    # Evenly spaced window indices over the whole set (all of them when wanted == n_windows).
    picked = torch.arange(wanted, dtype=torch.long) * n_windows // wanted
    windows = gather_windows(tokens, picked * seq_len, seq_len + 1)
    return list(windows.split(batch_size))


class IndexedBatches:
    """Supervised batches that are a function of their index alone (``batch(index)``,
    drawn from the run's seed and the index), so a checkpoint's whole data state is the
    index and resume is exact. Subclasses define ``batch``."""

    index = 0

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.index += 1
        return self.batch(self.index - 1)

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


class MetricMeans:
    """The means of named numbers a supervised loss saw since the last ``metrics`` call,
    training and evaluation batches apart (the trainer evaluates without gradients)."""

    def __init__(self):
        self._seen: dict[bool, list[dict[str, torch.Tensor]]] = {True: [], False: []}

    def add(self, training: bool, **values: torch.Tensor) -> None:
        self._seen[training].append({k: v.detach().float() for k, v in values.items()})

    def metrics(self, training: bool) -> dict[str, float]:
        seen, self._seen[training] = self._seen[training], []
        if not seen:
            return {}
        return {k: torch.stack([s[k] for s in seen]).mean().item() for k in seen[0]}


class ShardBatches:
    """Shuffled training batches streamed from token shards (``lmlab.data.TokenShards``)
    by rank and by DataLoader worker, resumable mid-shard.

    Each epoch visits the shards in an order drawn from ``(seed, epoch)`` and, inside
    each, its non-overlapping windows of ``seq_len + 1`` tokens in an order drawn from
    ``(seed, epoch, shard)``; batches take ``batch_size`` consecutive windows of that one
    global sequence (the last partial batch of an epoch is dropped). Global batch ``g`` is
    a function of ``g`` alone, so the position is one integer: the batches consumed by
    all ranks. Rank ``r`` of ``W`` takes batches ``r, r + W, ...`` after the position;
    with ``workers`` DataLoader processes, worker ``w`` reads every ``workers``-th of
    those, and the DataLoader hands them back in order. Only the windows of a batch are
    read (and one shard's window order is held), so the corpus may exceed memory.
    """

    by_rank = True  # the trainer does not wrap it in RankBatches

    def __init__(
        self,
        shards,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
    ):
        self.shards = list(shards.shards)
        for i, shard in enumerate(self.shards):
            _check_tokens(shard, f"token shard {i}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.windows = torch.tensor([(len(s) - 1) // seq_len for s in self.shards])
        self.per_epoch = int(self.windows.sum()) // batch_size
        if self.per_epoch < 1:
            raise DataError(
                f"train shards: {int(self.windows.sum())} windows of seq_len + 1 = "
                f"{seq_len + 1} tokens, fewer than batch_size={batch_size}"
            )
        self.position = 0
        self._batches = None  # the running iterator, from self.position on
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None

    def batch(self, g: int) -> torch.Tensor:
        """Global batch ``g``: ``[batch_size, seq_len + 1]`` int64 windows."""
        epoch, index = divmod(g, self.per_epoch)
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        shard_order = torch.randperm(len(self.shards), generator=gen)
        ends = torch.cumsum(self.windows[shard_order], 0)  # window counts, in visiting order
        rows = []
        for k in range(index * self.batch_size, (index + 1) * self.batch_size):
            at = int(torch.searchsorted(ends, k, right=True))  # which visited shard
            shard = int(shard_order[at])
            local = k - (int(ends[at - 1]) if at else 0)
            start = int(self._window_order(epoch, shard)[local]) * self.seq_len
            rows.append(
                torch.from_numpy(
                    np.asarray(self.shards[shard][start : start + self.seq_len + 1]).astype(
                        np.int64
                    )
                )
            )
        return torch.stack(rows)

    def _window_order(self, epoch: int, shard: int) -> torch.Tensor:
        if self._order is None or self._order[0] != (epoch, shard):
            seed = _epoch_seed(_epoch_seed(self.seed, epoch), shard + 1)
            g = torch.Generator().manual_seed(seed)
            self._order = ((epoch, shard), torch.randperm(int(self.windows[shard]), generator=g))
        return self._order[1]

    def _mine(self, first: int):
        """This rank's batches from global batch ``first`` on (worker ``w`` of ``n``: every
        n-th of them, from the w-th)."""
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        j = w
        while True:
            yield self.batch(first + self.rank + self.world_size * j)
            j += n

    def next_batch(self) -> torch.Tensor:
        if self._batches is None:
            if self.workers:
                stream = _Stream(self, self.position)
                loader = torch.utils.data.DataLoader(
                    stream, batch_size=None, num_workers=self.workers
                )
                self._batches = iter(loader)
            else:
                self._batches = self._mine(self.position)
        self.position += self.world_size  # one batch for each rank
        return next(self._batches)

    def state_dict(self) -> dict[str, int]:
        return {"batch": self.position, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (
            state.get("seed") != self.seed
            or state.get("seq_len") != self.seq_len
            or "batch" not in state
        ):
            raise DataError(
                f"cannot continue the shard stream of a run with seed={state.get('seed')}, "
                f"seq_len={state.get('seq_len')} using seed={self.seed}, seq_len={self.seq_len}"
            )
        self.position, self._batches = int(state["batch"]), None


class _Stream(torch.utils.data.IterableDataset):
    """``ShardBatches._mine`` as a dataset, for DataLoader workers."""

    def __init__(self, batches: ShardBatches, first: int):
        self.batches, self.first = batches, first

    def __iter__(self):
        return self.batches._mine(self.first)
