"""Supervised fine-tuning through the trainer: response-only loss, KL regularisation,
resumable example batches, exact resume."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lmlab.data.instructions import IGNORE, EncodedExample, collate, pack
from lmlab.errors import DataError
from lmlab.finetune.sft import (
    ExampleBatches,
    fixed_batches,
    kl_sft_loss,
    sft_loss,
    supervised_data,
)
from lmlab.models import build_model
from lmlab.train import Supervised, TrainConfig, train

V = 20
NO_AUTOCAST = contextlib.nullcontext


def tiny_model(seed=0):
    torch.manual_seed(seed)
    spec = dict(family="transformer", vocab_size=V, d_model=32, n_layers=2, n_heads=4)
    return build_model({**spec, "d_ff": 64, "max_seq_len": 32})


def toy_examples(n=24, seed=0):
    """Prompt: token 1 then a digit d in 2..9; response: d + 10, then the end token 19."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = int(torch.randint(2, 10, (1,), generator=g))
        pad = torch.randint(2, 10, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
        prompt = [1, *pad.tolist(), d]
        ids = prompt + [d + 10, 19]
        labels = [IGNORE] * len(prompt) + [d + 10, 19]
        out.append(EncodedExample(ids, labels))
    return out


def test_sft_loss_is_cross_entropy_on_labelled_tokens_only():
    model = tiny_model().eval()
    batch = collate(toy_examples(4), pad_id=0)
    loss, count = sft_loss(model, batch, NO_AUTOCAST)
    logits = model(batch["ids"])
    expected, n = 0.0, 0
    for b in range(4):
        for t in range(batch["ids"].shape[1] - 1):
            label = int(batch["labels"][b, t + 1])
            if label != IGNORE:
                expected += -logits[b, t].log_softmax(-1)[label].item()
                n += 1
    assert int(count) == n == 8  # two response tokens per example
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_packed_batch_has_the_loss_of_its_examples_alone():
    """pack() puts several examples in a row; with segments each attends only to itself
    and restarts its positions, so the summed loss and the count equal the unpacked ones."""
    model = tiny_model().eval()
    examples = toy_examples(6)
    packed = pack(examples, seq_len=16)
    assert len(packed) < len(examples)
    loose, n_loose = sft_loss(model, collate(examples, pad_id=0), NO_AUTOCAST)
    tight, n_tight = sft_loss(model, collate(packed, pad_id=0), NO_AUTOCAST)
    assert int(n_tight) == int(n_loose)
    assert tight.item() == pytest.approx(loose.item(), rel=1e-5)


def test_a_batch_with_nothing_to_learn_is_an_error_not_a_zero_loss():
    batch = collate([EncodedExample([1, 2, 3], [IGNORE] * 3)], pad_id=0)
    with pytest.raises(DataError, match="no response tokens"):
        sft_loss(tiny_model(), batch, NO_AUTOCAST)


def test_example_batches_are_deterministic_and_resumable():
    data = toy_examples(10)
    a = ExampleBatches(data, 4, seed=3, pad_id=0)
    first = [a.next_batch()["ids"] for _ in range(3)]  # crosses an epoch (10 // 4 = 2)
    state = a.state_dict()
    rest = [a.next_batch()["ids"] for _ in range(3)]
    b = ExampleBatches(data, 4, seed=3, pad_id=0)
    assert all(torch.equal(x, y) for x, y in zip(first, [b.next_batch()["ids"] for _ in range(3)]))
    c = ExampleBatches(data, 4, seed=3, pad_id=0)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, [c.next_batch()["ids"] for _ in range(3)]))


def test_example_batches_take_their_collate_function():
    """Preference pairs (or anything) batch through the same resumable sampler."""

    def as_ids(items, pad_id):
        return {"ids": torch.tensor(items) + pad_id}

    a = ExampleBatches(list(range(10)), 4, seed=3, pad_id=100, collate_fn=as_ids)
    first = a.next_batch()["ids"]
    assert len(set(first.tolist())) == 4 and all(100 <= i < 110 for i in first.tolist())
    state = a.state_dict()
    b = ExampleBatches(list(range(10)), 4, seed=3, pad_id=100, collate_fn=as_ids)
    b.load_state_dict(state)
    assert torch.equal(a.next_batch()["ids"], b.next_batch()["ids"])
    val = fixed_batches(list(range(5)), 2, 0, collate_fn=as_ids)
    assert [v["ids"].tolist() for v in val] == [[0, 1], [2, 3], [4]]


def test_validation_is_the_first_eval_batches_batches_of_the_held_out_rows():
    def as_ids(items, pad_id):
        return {"ids": torch.tensor(items)}

    config = TrainConfig(out_dir="unused", batch_size=2, eval_batches=2)
    data = supervised_data(list(range(10)), list(range(20, 27)), sft_loss, config, 0, as_ids)
    assert [v["ids"].tolist() for v in data.val] == [[20, 21], [22, 23]]
    config = TrainConfig(out_dir="unused", batch_size=4, eval_batches=20)
    data = supervised_data(list(range(10)), list(range(20, 27)), sft_loss, config, 0, as_ids)
    assert [v["ids"].tolist() for v in data.val] == [[20, 21, 22, 23], [24, 25, 26]]
    assert supervised_data(list(range(10)), [], sft_loss, config, 0, as_ids).val is None


def settings(tmp_path, name, **kw):
    base = dict(
        out_dir=str(tmp_path / name),
        max_steps=40,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        eval_interval=20,
        ckpt_interval=20,
        log_interval=5,
        precision="fp32",
        progress=False,
        spike_factor=None,
        seed=0,
    )
    return TrainConfig(**{**base, **kw})


def supervised(loss=sft_loss):
    data = toy_examples(48)
    return Supervised(
        ExampleBatches(data[:40], 8, seed=0, pad_id=0), loss, fixed_batches(data[40:], 8, 0)
    )


def test_sft_through_the_trainer_learns_the_responses(tmp_path):
    model = tiny_model()
    config = settings(tmp_path, "sft", max_steps=60, lr=1e-2)
    result = train(model, None, None, config, supervised=supervised())
    before = sft_loss(tiny_model().eval(), supervised().val[0], NO_AUTOCAST)
    after = sft_loss(model.eval(), supervised().val[0], NO_AUTOCAST)
    # ln 20 = 3.0 nats at the start; the end token and d + 10 are learnable exactly
    assert before[0] / before[1] > 2.5 and after[0] / after[1] < 0.5
    assert result.val_losses[-1][1] < result.val_losses[0][1]


def test_sft_resume_is_exact(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_25(event):
        if event["event"] == "train" and event["step"] == 25:
            raise Crash

    full = tiny_model()
    train(full, None, None, settings(tmp_path, "full"), supervised=supervised())
    broken = tiny_model()
    with pytest.raises(Crash):
        train(
            broken,
            None,
            None,
            settings(tmp_path, "resumed"),
            supervised=supervised(),
            callbacks=[crash_at_25],
        )
    resumed = tiny_model(seed=1)  # different start: everything must come from the checkpoint
    train(
        resumed, None, None, settings(tmp_path, "resumed", resume="auto"), supervised=supervised()
    )
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_kl_term_is_zero_against_itself_and_keeps_the_model_close(tmp_path):
    reference = tiny_model().eval()
    batch = collate(toy_examples(4), pad_id=0)
    same = kl_sft_loss(tiny_model(), beta=5.0)(reference, batch, NO_AUTOCAST)
    plain = sft_loss(reference, batch, NO_AUTOCAST)
    torch.testing.assert_close(same[0], plain[0], atol=1e-4, rtol=1e-6)  # KL(p || p) = 0

    def drift(model):
        """Mean KL(model || reference) per labelled position on held-out examples."""
        held_out = collate(toy_examples(16, seed=9), pad_id=0)
        with torch.no_grad():
            p = model.eval()(held_out["ids"])[:, :-1].log_softmax(-1)
            q = reference(held_out["ids"])[:, :-1].log_softmax(-1)
        scored = held_out["labels"][:, 1:] != IGNORE
        return F.kl_div(q[scored], p[scored], log_target=True, reduction="batchmean").item()

    free, tied = tiny_model(), tiny_model()
    train(free, None, None, settings(tmp_path, "free"), supervised=supervised())
    loss = kl_sft_loss(reference, beta=5.0)
    train(tied, None, None, settings(tmp_path, "kl"), supervised=supervised(loss))
    assert drift(tied) < 0.5 * drift(free)


def test_supervised_refuses_token_arrays_and_scheduled_sampling(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        train(tiny_model(), [1, 2], None, settings(tmp_path, "a"), supervised=supervised())
    config = settings(tmp_path, "b", objective="linear", ss_c=0.01)
    with pytest.raises(ValueError, match="teacher_forcing"):
        train(tiny_model(), None, None, config, supervised=supervised())


def test_the_summary_says_when_only_the_first_validation_examples_are_scored():
    from types import SimpleNamespace

    from lmlab.cli.summaries import trained_lines

    result = SimpleNamespace(
        trainable=10, total=100, train=SimpleNamespace(step=5, wall_time_s=1.0)
    )
    capped = {"train": 90, "val": 500, "skipped": 0, "val_scored": 160}
    line = trained_lines("lora", result, "examples", capped)[-1]
    assert line == (
        "examples: 90 train, 500 validation (the first 160 scored: --train.eval_batches), 0 skipped"
    )
    whole = {"train": 90, "val": 10, "skipped": 1, "val_scored": 10}
    assert trained_lines("lora", result, "examples", whole)[-1] == (
        "examples: 90 train, 10 validation, 1 skipped"
    )
