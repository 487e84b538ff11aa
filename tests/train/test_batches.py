import numpy as np
import pytest
import torch

from lmlab.errors import DataError
from lmlab.train.batches import TrainBatches, fixed_batches


def positions(n):
    """Token i is i, so a window shows where it was cut from."""
    return np.arange(n, dtype=np.uint32)


def take(batches, n):
    return torch.cat([batches.next_batch() for _ in range(n)])


def test_windows_are_consecutive_and_share_one_token():
    batches = TrainBatches(positions(100), batch_size=3, seq_len=8, seed=0)
    windows = batches.next_batch()
    assert windows.shape == (3, 9) and windows.dtype == torch.int64
    assert torch.equal(windows - windows[:, :1], torch.arange(9).expand(3, 9))
    offset = int(windows[0, 0]) % 8  # windows start on the epoch's grid: offset + k * seq_len
    assert torch.all(windows[:, 0] % 8 == offset)


def test_epoch_visits_every_window_once_in_shuffled_order():
    tokens = positions(8 * 20 + 8)  # every offset gives 20 windows
    batches = TrainBatches(tokens, batch_size=4, seq_len=8, seed=0)
    epoch0 = take(batches, 5)[:, 0]
    assert len(set(epoch0.tolist())) == 20
    assert epoch0.tolist() != sorted(epoch0.tolist())
    assert (batches.epoch, batches.index) == (0, 20)
    epoch1 = take(batches, 5)[:, 0]
    assert batches.epoch == 1
    assert epoch1.tolist() != epoch0.tolist()


def test_order_depends_only_on_seed():
    a = take(TrainBatches(positions(500), 4, 8, seed=1), 10)
    b = take(TrainBatches(positions(500), 4, 8, seed=1), 10)
    c = take(TrainBatches(positions(500), 4, 8, seed=2), 10)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_incomplete_last_batch_of_epoch_is_dropped():
    tokens = positions(8 * 10 + 1)  # offset 0: 10 windows; batch 4 -> 2 batches, 2 dropped
    batches = TrainBatches(tokens, batch_size=4, seq_len=8, seed=0, random_offset=False)
    take(batches, 2)
    assert (batches.epoch, batches.index) == (0, 8)
    batches.next_batch()
    assert (batches.epoch, batches.index) == (1, 4)


def test_resume_mid_epoch_continues_the_same_order():
    tokens = positions(400)
    uninterrupted = TrainBatches(tokens, 3, 8, seed=5)
    want = take(uninterrupted, 30)  # several epochs of 16 windows / 3 per batch
    first = TrainBatches(tokens, 3, 8, seed=5)
    take(first, 7)
    state = first.state_dict()
    assert state["index"] > 0  # mid-epoch
    resumed = TrainBatches(tokens, 3, 8, seed=5)
    resumed.load_state_dict(state)
    assert torch.equal(take(resumed, 23), want[7 * 3 :])


def test_resume_with_other_seed_or_seq_len_is_refused():
    batches = TrainBatches(positions(400), 3, 8, seed=5)
    with pytest.raises(DataError, match="seed=5, seq_len=8 using seed=6, seq_len=8"):
        TrainBatches(positions(400), 3, 8, seed=6).load_state_dict(batches.state_dict())


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_memmap_and_tensor_inputs_give_the_same_batches(tmp_path, dtype):
    tokens = (np.arange(1000) % 300).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    memmap = np.memmap(path, dtype=dtype, mode="r")
    from_memmap = take(TrainBatches(memmap, 4, 16, seed=0), 5)
    from_tensor = take(TrainBatches(torch.from_numpy(tokens.astype(np.int64)), 4, 16, seed=0), 5)
    assert from_memmap.dtype == torch.int64
    assert torch.equal(from_memmap, from_tensor)


def test_too_few_tokens_says_how_many_are_needed():
    with pytest.raises(
        DataError, match=r"100 tokens make 11 windows .* batch_size=16; give at least 136"
    ):
        TrainBatches(positions(100), batch_size=16, seq_len=8, seed=0)
    with pytest.raises(DataError, match="135 tokens"):
        TrainBatches(positions(135), batch_size=16, seq_len=8, seed=0)
    for seed in range(20):  # 136 is enough whatever offset an epoch draws
        batches = TrainBatches(positions(136), batch_size=16, seq_len=8, seed=seed)
        assert len(take(batches, 3)) == 48


@pytest.mark.parametrize("bad", [np.zeros((4, 50), np.int64), np.zeros(50, np.float32), [1, 2, 3]])
def test_non_1d_integer_tokens_are_rejected(bad):
    with pytest.raises(DataError, match="train tokens must be"):
        TrainBatches(bad, 2, 4, seed=0)


def test_fixed_batches_are_spread_and_deterministic():
    tokens = positions(8 * 100 + 1)  # 100 windows
    batches = fixed_batches(tokens, batch_size=4, seq_len=8, n_batches=5)
    starts = torch.cat(batches)[:, 0]
    assert [b.shape for b in batches] == [(4, 9)] * 5
    assert starts.tolist() == [k * 5 * 8 for k in range(20)]  # every 5th window
    assert all(torch.equal(a, b) for a, b in zip(batches, fixed_batches(tokens, 4, 8, 5)))
    few = fixed_batches(positions(8 * 6 + 1), batch_size=4, seq_len=8, n_batches=5)
    assert [len(b) for b in few] == [4, 2]


def test_fixed_batches_too_short():
    with pytest.raises(DataError, match="5 tokens are fewer than seq_len \\+ 1 = 9"):
        fixed_batches(positions(5), 4, 8, 2)
