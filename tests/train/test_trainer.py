"""The training loop: resume, guards, accumulation, precision, outputs.

Most tests use the toy bigram model of conftest.py on ``next = token + 1 (mod 15)`` data
(token 15, the "poison", never occurs unless a test plants it); two use the real
transformer family. Crashes are simulated by a callback raising from inside the loop.
"""

import contextlib
import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch

from lmlab.checkpoint.io import (
    COMPLETE_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_dir,
    list_checkpoints,
    load_model,
    load_train_state,
)
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import build_model, get_preset
from lmlab.train import Supervised, TrainConfig, TrainingDiverged, train
from lmlab.train import trainer as trainer_module
from lmlab.train.batches import TrainBatches
from lmlab.train.guards import StepGuard
from lmlab.train.metrics import read_metrics
from lmlab.train.optim import lr_at

POISON = 15
DATA = (np.arange(1200) % 15).astype(np.uint16)
VAL = (np.arange(400) % 15).astype(np.uint16)


class Crash(Exception):
    """A simulated crash (a kill, a power cut) from inside the training loop."""


def settings(tmp_path, name="run", **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(tmp_path / name),
        max_steps=12,
        batch_size=4,
        seq_len=8,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        eval_interval=4,
        eval_batches=2,
        ckpt_interval=4,
        keep_last=None,
        log_interval=1,
        precision="fp32",
        progress=False,
        spike_factor=None,
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def crash_at(step):
    def callback(event):
        if event["event"] == "train" and event["step"] == step:
            raise Crash(step)

    return callback


def params_of(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_params(a, b):
    a = a if isinstance(a, dict) else params_of(a)
    b = b if isinstance(b, dict) else params_of(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def crash_and_resume(make_model, config, crash_step, data=DATA, val=VAL, prepare=None):
    """Train until a crash at ``crash_step``, then resume with a model initialised
    differently. -> (result of the resumed run, resumed model)."""
    prepare = prepare or (lambda model: model)
    with pytest.raises(Crash):
        train(prepare(make_model(seed=0)), data, val, config, callbacks=[crash_at(crash_step)])
    model = prepare(make_model(seed=1))
    result = train(model, data, val, dataclasses.replace(config, resume="auto"))
    return result, model


def after(history, step):
    return [(s, v) for s, v in history if s > step]


def poison_hook(scale):
    """Multiply the logits by ``scale`` for a training batch holding the poison token."""

    def hook(module, args, output):
        if module.training and bool((args[0] == POISON).any()):
            return output * scale

    return hook


def poisoned(step, config, data=DATA):
    """A copy of ``data`` with the poison in the inputs of the first micro-batch of
    ``step`` (1-based, steps counted as batches drawn; first epoch only)."""
    finder = TrainBatches(np.arange(len(data)), config.batch_size, config.seq_len, config.seed)
    for _ in range((step - 1) * config.grad_accum):
        finder.next_batch()
    start = int(finder.next_batch()[0, 0])
    out = data.copy()
    out[start + 1] = POISON
    return out


def events(config, kind):
    return [e for e in read_metrics(f"{config.out_dir}/metrics.jsonl") if e["event"] == kind]


def make_gpt(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 32, "d_model": 32, "n_layers": 2}
    return build_model({**spec, "n_heads": 2, "d_ff": 64, "max_seq_len": 16, "dropout": dropout})


# ----------------------------------------------------------------------------- resume (1-4)


def test_resume_is_bit_exact(make_toy, tmp_path):
    reference = make_toy()
    want = train(reference, DATA, VAL, settings(tmp_path, "uninterrupted"))
    config = settings(tmp_path, "crashed")
    result, resumed = crash_and_resume(make_toy, config, crash_step=10)  # resumes at 8
    assert result.train_losses == after(want.train_losses, 8)
    assert result.val_losses == after(want.val_losses, 8)
    assert_same_params(resumed, reference)
    # metrics.jsonl continues: steps 9 and 10 of the crashed run are not listed twice
    assert [e["step"] for e in events(config, "train")] == list(range(1, 13))
    assert [e["step"] for e in events(config, "resume")] == [8]


def test_transformer_resume_is_bit_exact(tmp_path):
    """The real family: tied embeddings, dropout, AdamW, accumulation."""
    config = dict(max_steps=6, ckpt_interval=3, grad_accum=2, batch_size=2, seq_len=16)
    reference = make_gpt()
    want = train(reference, DATA, VAL, settings(tmp_path, "a", **config))
    result, resumed = crash_and_resume(make_gpt, settings(tmp_path, "b", **config), crash_step=5)
    assert result.train_losses == after(want.train_losses, 3)
    assert_same_params(resumed, reference)
    assert resumed.lm_head.weight is resumed.tok_emb.weight


def test_resume_mid_epoch_same_data_order_with_accumulation(make_toy, tmp_path):
    data = (np.arange(200) % 15).astype(np.uint16)  # 24 windows: 4 steps of 2 x 3 per epoch
    config = settings(tmp_path, "b", max_steps=10, batch_size=3, grad_accum=2, ckpt_interval=3)

    def recording(seen):
        def prepare(model):
            model.register_forward_hook(
                lambda m, args, out: seen.append(args[0].clone()) if m.training else None
            )
            return model

        return prepare

    want: list[torch.Tensor] = []
    train(
        recording(want)(make_toy()),
        data,
        None,
        dataclasses.replace(config, out_dir=str(tmp_path / "a")),
    )
    got: list[torch.Tensor] = []
    crash_and_resume(make_toy, config, crash_step=5, data=data, val=None, prepare=recording(got))
    position = load_train_state(checkpoint_dir(config.out_dir, 3))["data"]
    assert (position["epoch"], position["index"]) == (0, 18)  # resumed mid-epoch
    resumed_part = got[5 * 2 :]  # the crashed run drew 5 steps x 2 micro-batches first
    assert len(resumed_part) == (10 - 3) * 2
    assert torch.equal(torch.stack(resumed_part), torch.stack(want[3 * 2 :]))
    assert not torch.equal(torch.stack(want[:8]), torch.stack(want[8:16]))  # epochs differ


def test_dropout_rng_restored(make_toy, tmp_path, monkeypatch):
    make = functools.partial(make_toy, dropout=0.5)
    reference = make()
    train(reference, DATA, VAL, settings(tmp_path, "a"))
    _, resumed = crash_and_resume(make, settings(tmp_path, "b"), crash_step=10)
    assert_same_params(resumed, reference)
    # Control: without restoring the RNG, dropout draws other masks and the runs differ.
    monkeypatch.setattr(trainer_module, "_set_rng_state", lambda state, device: None)
    _, unrestored = crash_and_resume(make, settings(tmp_path, "c"), crash_step=10)
    assert not torch.equal(unrestored.head.weight, reference.head.weight)


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def test_train_state_loads_with_weights_only(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=4, spike_factor=3.0, spike_warmup=1, spike_window=2)
    train(make_toy(dropout=0.1), DATA, VAL, config)
    file = checkpoint_dir(config.out_dir, 4) / TRAIN_STATE_FILE
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert {"step", "optimizer", "scheduler", "rng", "data", "guard"} <= set(state)
    assert state["step"] == 4
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert len(state["guard"]["losses"]) == 2
    assert _plain(state)  # no numpy or other pickled objects anywhere


def test_resume_with_nothing_to_resume_is_an_error(make_toy, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="resume=.*empty.*nothing to resume"):
        train(make_toy(), DATA, VAL, settings(tmp_path, resume=str(empty)))


def test_resume_bogus_path_is_an_error(make_toy, tmp_path):
    with pytest.raises(CheckpointError, match="resume=.*nope.*no such checkpoint"):
        train(make_toy(), DATA, VAL, settings(tmp_path, resume=str(tmp_path / "nope")))


def test_resume_with_init_from_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be used together"):
        settings(tmp_path, resume="auto", init_from=str(tmp_path))


def test_resume_auto_starts_fresh_when_nothing_exists(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=3, resume="auto")
    result = train(make_toy(), DATA, VAL, config)
    assert result.step == 3
    assert events(config, "resume") == []
    again = train(make_toy(), DATA, VAL, dataclasses.replace(config, max_steps=5))
    assert [e["step"] for e in events(config, "resume")] == [3]
    assert again.step == 5


def test_fresh_run_refuses_an_out_dir_with_checkpoints(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=2)
    train(make_toy(), DATA, VAL, config)
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume='auto'"):
        train(make_toy(), DATA, VAL, config)


def test_resume_from_a_different_model_is_an_error(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=2)
    train(make_toy(), DATA, VAL, config)
    other = build_model({"family": "toy", "d_model": 4})
    with pytest.raises(CheckpointError, match="different model .*d_model: 8 there, 4 here"):
        train(other, DATA, VAL, dataclasses.replace(config, resume="auto"))


def test_resume_from_a_model_only_checkpoint_is_an_error(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=2)
    train(make_toy(), DATA, VAL, config)
    (checkpoint_dir(config.out_dir, 2) / TRAIN_STATE_FILE).unlink()
    complete = checkpoint_dir(config.out_dir, 2) / COMPLETE_FILE
    marker = json.loads(complete.read_text())
    del marker["files"][TRAIN_STATE_FILE]
    complete.write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="no train_state.pt.*init_from"):
        train(make_toy(), DATA, VAL, dataclasses.replace(config, resume="auto"))


def test_init_from_starts_from_saved_weights(make_toy, tmp_path):
    source = settings(tmp_path, "source", max_steps=12, lr=3e-2)
    train(make_toy(), DATA, VAL, source)
    trained, _, _ = load_model(source.out_dir)
    config = settings(tmp_path, "finetune", max_steps=2, init_from=source.out_dir)
    result = train(make_toy(seed=1), DATA, VAL, config)
    first = TrainBatches(DATA, config.batch_size, config.seq_len, config.seed).next_batch()
    with torch.no_grad():
        logits = trained.train()(first[:, :-1])
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), first[:, 1:].flatten())
    assert result.train_losses[0][1] == pytest.approx(want.item(), rel=1e-6)


# ----------------------------------------------------------------------------- checkpoints (5-7)


def test_partial_newest_checkpoint_is_skipped(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=8)
    reference = make_toy()
    train(reference, DATA, VAL, config)
    newest = checkpoint_dir(config.out_dir, 8)
    (newest / COMPLETE_FILE).unlink()  # a crash mid-save: no marker, half the weights
    weights = newest / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = make_toy(seed=1)
    with pytest.warns(
        UserWarning, match="skipping incomplete checkpoint .*step-00000008.*COMPLETE"
    ):
        train(resumed, DATA, VAL, dataclasses.replace(config, resume="auto"))
    assert [e["from"].rsplit("/", 1)[-1] for e in events(config, "resume")] == ["step-00000004"]
    assert_same_params(resumed, reference)
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step-00000004", "step-00000008"]


def test_crash_during_save_keeps_previous(make_toy, tmp_path, monkeypatch):
    config = settings(tmp_path, max_steps=8)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if obj["step"] == 8:
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a file")
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(torch, "save", failing_save)
        train(make_toy(), DATA, VAL, config)
    folder = checkpoint_dir(config.out_dir, 0).parent
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004"]  # no temp left
    result = train(make_toy(seed=1), DATA, VAL, dataclasses.replace(config, resume="auto"))
    assert [e["step"] for e in events(config, "resume")] == [4]
    assert result.step == 8


def test_rotation_keeps_n_newest(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=9, ckpt_interval=2, keep_last=2)
    result = train(make_toy(), DATA, VAL, config)
    names = [p.name for p in list_checkpoints(config.out_dir)]
    assert names == ["step-00000008", "step-00000009"]  # 2, 4, 6 rotated away; 9 is the end
    assert result.checkpoint == checkpoint_dir(config.out_dir, 9)


def test_rotation_keeps_the_best_when_tracked(make_toy, tmp_path):
    # Validation on the reverse pattern (next = token - 1): the better the model learns
    # next = token + 1, the worse it does there, so the best checkpoint is the first.
    reverse = (14 - np.arange(400) % 15).astype(np.uint16)
    config = settings(
        tmp_path, max_steps=8, ckpt_interval=2, keep_last=1, keep_best=True, eval_interval=100
    )
    train(make_toy(), DATA, reverse, config)
    vals = {e["step"]: e["val_loss"] for e in events(config, "eval")}
    assert sorted(vals) == [2, 4, 6, 8]  # evaluated at every save
    assert min(vals, key=vals.get) == 2
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step-00000002", "step-00000008"]


# ----------------------------------------------------------------------------- guards (8-11)


def test_nonfinite_step_is_skipped(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=10, batch_size=2, grad_accum=2)
    model = make_toy()
    model.register_forward_hook(poison_hook(math.nan))
    forwards = []
    model.register_forward_hook(lambda m, a, o: forwards.append(1) if m.training else None)
    result = train(model, poisoned(4, config), VAL, config)
    assert result.step == 10  # only applied steps count
    assert [(e["step"], e["reason"]) for e in result.skipped] == [(3, "nonfinite_loss")]
    assert len(forwards) == (10 + 1) * 2  # the skipped step's batches were drawn
    skip = events(config, "skip")[0]
    assert skip["loss"] is None  # NaN is written as null
    # optimizer and schedule did not advance on the skipped step
    state = load_train_state(checkpoint_dir(config.out_dir, 10))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {10}
    assert [e["lr"] for e in events(config, "train")] == [lr_at(s, config) for s in range(10)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_is_skipped(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=6)
    model = make_toy()
    seen = {"poison": False}

    def spot(module, args, output):
        seen["poison"] = module.training and bool((args[0] == POISON).any())

    model.register_forward_hook(spot)
    model.head.weight.register_hook(lambda g: g * math.inf if seen["poison"] else None)
    result = train(model, poisoned(3, config), VAL, config)
    assert [(e["step"], e["reason"]) for e in result.skipped] == [(2, "nonfinite_grad")]
    assert result.step == 6
    assert math.isfinite(result.skipped[0]["loss"])


def test_persistent_nan_stops_run(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=10, ckpt_interval=1, max_nonfinite=3)
    model = make_toy()
    model.register_forward_hook(lambda m, a, out: out * math.nan)
    with pytest.raises(TrainingDiverged, match="3 steps in a row had a non-finite loss"):
        train(model, DATA, VAL, config)
    assert list_checkpoints(config.out_dir) == []
    assert [e["reason"] for e in events(config, "skip")] == ["nonfinite_loss"] * 3


def test_no_checkpoint_from_non_finite_weights(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=4, ckpt_interval=2, eval_interval=100)
    model = make_toy()

    def corrupt(event):
        if event["event"] == "train" and event["step"] == 2:
            with torch.no_grad():
                model.proj.weight[0, 0] = math.nan

    with pytest.raises(TrainingDiverged, match="not finite at step 2"):
        train(model, DATA, VAL, config, callbacks=[corrupt])
    assert list_checkpoints(config.out_dir) == []


def test_resume_after_skip_is_exact(make_toy, tmp_path):
    config = settings(tmp_path, "a")
    data = poisoned(6, config)

    def prepare(model):
        model.register_forward_hook(poison_hook(math.nan))
        return model

    reference = prepare(make_toy())
    want = train(reference, data, VAL, config)
    assert [e["step"] for e in want.skipped] == [5]  # skipped before the checkpoint at 8
    config = settings(tmp_path, "b")
    result, resumed = crash_and_resume(make_toy, config, 10, data=data, prepare=prepare)
    assert result.train_losses == after(want.train_losses, 8)
    assert_same_params(resumed, reference)


def test_loss_spike_rolls_back(make_toy, tmp_path):
    config = settings(
        tmp_path, max_steps=14, lr=3e-2, spike_factor=3.0, spike_window=4, spike_warmup=4
    )
    model = make_toy()
    model.register_forward_hook(poison_hook(50.0))  # a finite but absurd loss
    seen = {}

    def watch(event):
        if event["event"] == "train":
            seen["last_good"] = params_of(model)
        elif event["event"] == "skip":
            seen["at_skip"] = params_of(model)
            seen["before_skip"] = seen["last_good"]

    result = train(model, poisoned(10, config), VAL, config, callbacks=[watch])
    assert [(e["step"], e["reason"]) for e in result.skipped] == [(9, "loss_spike")]
    recent = [loss for _, loss in result.train_losses[5:9]]
    assert result.skipped[0]["loss"] > 3.0 * sorted(recent)[2]
    assert_same_params(seen["at_skip"], seen["before_skip"])  # the pre-spike state
    assert result.step == 14  # recovered: the skipped step did not count
    assert result.train_losses[-1][1] < result.train_losses[8][1]


def test_spike_guard_state_survives_checkpoint(make_toy, tmp_path, monkeypatch):
    config = settings(
        tmp_path, max_steps=8, ckpt_interval=8, spike_factor=3.0, spike_window=4, spike_warmup=4
    )
    data = poisoned(9, config)  # the first batch after the checkpoint spikes

    def run(name):
        first = make_toy()
        first.register_forward_hook(poison_hook(50.0))
        first_config = dataclasses.replace(config, out_dir=str(tmp_path / name))
        train(first, data, VAL, first_config)
        resumed = make_toy(seed=1)
        resumed.register_forward_hook(poison_hook(50.0))
        more = dataclasses.replace(first_config, max_steps=10, resume="auto")
        return train(resumed, data, VAL, more)

    assert [(e["step"], e["reason"]) for e in run("a").skipped] == [(8, "loss_spike")]
    # Control: a guard that forgets its window on resume cannot see the spike.
    monkeypatch.setattr(StepGuard, "load_state_dict", lambda self, state: None)
    assert run("b").skipped == []


# ----------------------------------------------------------------------------- interrupts


def test_keyboard_interrupt_saves_a_checkpoint(make_toy, tmp_path):
    reference = make_toy(dropout=0.5)
    train(reference, DATA, VAL, settings(tmp_path, "a"))
    config = settings(tmp_path, "b")

    def interrupt(event):
        if event["event"] == "train" and event["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_toy(dropout=0.5), DATA, VAL, config, callbacks=[interrupt])
    assert [p.name for p in list_checkpoints(config.out_dir)] == ["step-00000004", "step-00000006"]
    resumed = make_toy(dropout=0.5, seed=1)
    train(resumed, DATA, VAL, dataclasses.replace(config, resume="auto"))
    assert_same_params(resumed, reference)


def test_interrupt_mid_step_replays_the_step(make_toy, tmp_path):
    reference = make_toy(dropout=0.5)
    train(reference, DATA, VAL, settings(tmp_path, "a", grad_accum=2))
    config = settings(tmp_path, "b", grad_accum=2)
    model = make_toy(dropout=0.5)
    forwards = []

    def interrupt(module, args, output):
        if module.training:
            forwards.append(1)
            if len(forwards) == 14:  # the second micro-batch of step 7
                raise KeyboardInterrupt

    model.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(model, DATA, VAL, config)
    assert list_checkpoints(config.out_dir)[-1].name == "step-00000006"
    resumed = make_toy(dropout=0.5, seed=1)
    train(resumed, DATA, VAL, dataclasses.replace(config, resume="auto"))
    assert_same_params(resumed, reference)


# ----------------------------------------------------------------------------- the step


def test_accumulated_gradients_equal_one_big_batch(make_toy):
    """Batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same 8 windows (the
    window order does not depend on the batch size) and give the same mean loss and
    gradients. Tolerance: the same float32 terms summed in another order, rtol 1e-5."""
    results = []
    for batch_size, accum in [(8, 1), (2, 4)]:
        model = make_toy()
        batches = TrainBatches(DATA, batch_size, 8, seed=0)
        loss = trainer_module._accumulate_gradients(
            model, batches, accum, torch.device("cpu"), contextlib.nullcontext
        )
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_accumulation_invariant_over_training(make_toy, tmp_path):
    """Three SGD steps; tolerance as above, grown a little over the steps (rtol 1e-5)."""
    common = dict(max_steps=3, optimizer="sgd", lr=0.5, min_lr=0.0, grad_clip=None)
    big = make_toy()
    train(big, DATA, None, settings(tmp_path, "a", batch_size=8, grad_accum=1, **common))
    small = make_toy()
    train(small, DATA, None, settings(tmp_path, "b", batch_size=2, grad_accum=4, **common))
    moved = (big.head.weight - make_toy().head.weight).abs().max()
    assert moved > 1e-3  # the steps did something
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_path_runs(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=4, precision="bf16")
    model = make_toy()
    dtypes = set()
    model.head.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    result = train(model, DATA, VAL, config)
    assert dtypes == {torch.bfloat16}  # training and evaluation ran under autocast
    assert model.head.weight.dtype == torch.float32  # weights stay float32
    assert all(math.isfinite(loss) for _, loss in result.train_losses + result.val_losses)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["precision"] == "bf16"


@pytest.mark.parametrize(("supported", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_uses_bf16_only_where_supported(
    make_toy, tmp_path, monkeypatch, supported, dtype
):
    monkeypatch.setattr(trainer_module, "bf16_supported", lambda device: supported)
    model = make_toy()
    dtypes = set()
    model.head.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    train(model, DATA, None, settings(tmp_path, max_steps=2, precision="auto"))
    assert dtypes == {dtype}


def test_bf16_supported_answers_per_device():
    assert isinstance(trainer_module.bf16_supported("cpu"), bool)
    assert trainer_module.bf16_supported("meta") is False


# ----------------------------------------------------------------------------- outputs


def test_metrics_jsonl_loss_png_and_config_written(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=8, log_interval=2)
    result = train(make_toy(), DATA, VAL, config)
    run = tmp_path / "run"
    assert [e["step"] for e in events(config, "train")] == [2, 4, 6, 8]
    evals = events(config, "eval")
    assert [e["step"] for e in evals] == [4, 8]
    assert all(e["val_ppl"] == pytest.approx(math.exp(e["val_loss"])) for e in evals)
    assert [e["step"] for e in events(config, "checkpoint")] == [4, 8]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 8 and saved["model"]["family"] == "toy"
    assert result.step == 8 and result.tokens_per_s > 0 and result.wall_time_s > 0
    assert [s for s, _ in result.train_losses] == list(range(1, 9))
    assert result.train_losses[-1][1] < result.train_losses[0][1]


def test_tokenizer_is_saved_in_each_checkpoint(make_toy, tmp_path):
    from lmlab.data.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train("abcdefghijklmno")
    config = settings(tmp_path, max_steps=4)
    train(make_toy(), DATA, VAL, config, tokenizer=tokenizer)
    _, loaded, saved = load_model(config.out_dir)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode("cab") == tokenizer.encode("cab") == [2, 0, 1]
    assert saved["tokenizer"]["kind"] == "char"


def test_time_budget_stops_and_saves(make_toy, tmp_path):
    import time

    config = settings(tmp_path, max_steps=1000, time_budget_s=0.3)
    slow = lambda event: time.sleep(0.1) if event["event"] == "train" else None
    result = train(make_toy(), DATA, None, config, callbacks=[slow])
    assert result.stop_reason == "time_budget"
    assert 1 <= result.step < 10
    assert result.checkpoint == checkpoint_dir(config.out_dir, result.step)


def test_time_budget_progress_bar_counts_seconds(make_toy, tmp_path, capsys):
    """A time-budgeted run's bar shows seconds of the budget, not a step total."""
    import time

    config = settings(tmp_path, max_steps=10**9, time_budget_s=0.3, progress=True)
    slow = lambda event: time.sleep(0.1) if event["event"] == "train" else None
    train(make_toy(), DATA, None, config, callbacks=[slow])
    err = capsys.readouterr().err
    assert "/0s" in err  # tqdm's total: round(0.3)
    assert str(10**9) not in err and "step=" in err


def test_seq_len_longer_than_the_context_is_an_error(make_toy, tmp_path):
    with pytest.raises(ConfigError, match="seq_len=32 .*max_seq_len\\) is 16"):
        train(make_toy(), DATA, VAL, settings(tmp_path, seq_len=32))


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """torch.compile (inductor) fuses and reorders float32 arithmetic, so losses agree to
    about 1e-5 relative rather than bit for bit; 1e-4 leaves room over 6 steps."""
    config = dict(max_steps=6, batch_size=2, seq_len=16)
    # no dropout: inductor draws its own random masks, so only deterministic maths compares
    eager, compiled = make_gpt(dropout=0.0), make_gpt(dropout=0.0)
    compiled.load_state_dict(eager.state_dict())
    want = train(eager, DATA, VAL, settings(tmp_path, "eager", **config))
    got = train(compiled, DATA, VAL, settings(tmp_path, "compiled", compile=True, **config))
    assert [s for s, _ in got.train_losses] == [s for s, _ in want.train_losses]
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in got.train_losses]),
        torch.tensor([loss for _, loss in want.train_losses]),
        rtol=1e-4,
        atol=1e-5,
    )


LADDER = {
    "bigram": dict(family="bigram", d_model=16),
    "mlp": dict(family="mlp", d_model=8, context=3, d_ff=16, dropout=0.1, direct=True),
    "bag": dict(family="bag", d_model=8, d_ff=16, dropout=0.1),
    "rnn": dict(family="recurrent", cell="rnn", d_model=16, n_layers=2, dropout=0.1),
    "gru": dict(family="recurrent", cell="gru", d_model=16, n_layers=1),
    "lstm": dict(family="recurrent", cell="lstm", d_model=16, n_layers=2, dropout=0.1),
}


@pytest.mark.parametrize("name", list(LADDER))
def test_every_family_resumes_bit_exact(name, tmp_path):
    """Item 1 for the ladder: stop at step 5, crash, resume from the step-3 checkpoint;
    steps 4..6 and the final parameters equal the uninterrupted run (dropout included)."""

    def make(seed=0):
        torch.manual_seed(seed)
        return build_model({**LADDER[name], "vocab_size": 32})

    config = dict(max_steps=6, ckpt_interval=3, grad_accum=2, batch_size=2, seq_len=16)
    reference = make()
    want = train(reference, DATA, VAL, settings(tmp_path, "a", **config))
    result, resumed = crash_and_resume(make, settings(tmp_path, "b", **config), crash_step=5)
    assert result.train_losses == after(want.train_losses, 3)
    assert_same_params(resumed, reference)


@pytest.mark.parametrize("objective", ["linear", "free_running"])
def test_scheduled_sampling_trains_and_resumes_bit_exact(objective, tmp_path):
    """The model's samples come from the global RNG, which checkpoints save: resume stays
    exact (item 1) under scheduled sampling too, for a recurrent model and a transformer."""
    for name, make in (("lstm", None), ("gpt", make_gpt)):
        if make is None:

            def make(seed=0):
                torch.manual_seed(seed)
                return build_model({**LADDER["lstm"], "vocab_size": 32})

        config = dict(
            max_steps=6, ckpt_interval=3, batch_size=2, seq_len=16, objective=objective, ss_c=0.1
        )
        reference = make()
        want = train(reference, DATA, VAL, settings(tmp_path, f"{name}-a", **config))
        result, resumed = crash_and_resume(
            make, settings(tmp_path, f"{name}-b", **config), crash_step=5
        )
        assert result.train_losses == after(want.train_losses, 3)
        assert_same_params(resumed, reference)
        teacher = make()
        forced = train(
            teacher,
            DATA,
            VAL,
            settings(tmp_path, f"{name}-tf", **{**config, "objective": "teacher_forcing"}),
        )
        assert forced.train_losses[-1] != want.train_losses[-1]  # the inputs really changed


def test_eval_events_carry_elapsed_time_even_without_train_logs(make_toy, tmp_path):
    """Regression: a run shorter than log_interval logged no train event, so nothing gave
    its evaluations a time (compare's loss-against-time curve came out empty)."""
    config = settings(tmp_path, max_steps=2, log_interval=10, eval_interval=10)
    train(make_toy(), DATA, VAL, config)
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    assert not any(e["event"] == "train" and e["step"] < 2 for e in events)
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["elapsed_s"] > 0


def test_a_supervised_loss_with_metrics_adds_them_to_train_and_eval_events(tmp_path):
    """A loss object with ``metrics(training)`` (DPO's rewards and accuracy) gets its numbers
    into the step's train event, and prefixed ``val_`` into eval events; the loss keeps
    training and evaluation calls apart (``model.training``)."""

    class CountingLoss:
        def __init__(self):
            self.calls = {True: 0, False: 0}

        def __call__(self, model, batch, autocast, keep=1.0):
            self.calls[model.training] += 1
            logits = model(batch["ids"])[:, :-1]  # (B, T-1, V)
            targets = batch["ids"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="sum"
            )
            return loss, torch.tensor(targets.numel())

        def metrics(self, training):
            calls, self.calls[training] = self.calls[training], 0
            return {"calls": float(calls)}

    class Batches:
        def next_batch(self):
            return {"ids": torch.arange(8).reshape(2, 4) % 15}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    loss = CountingLoss()
    val = [{"ids": torch.arange(8).reshape(2, 4) % 15}] * 3
    config = settings(tmp_path, max_steps=4, log_interval=2, eval_interval=4, grad_accum=2)
    train(make_gpt(dropout=0.0), None, None, config, supervised=Supervised(Batches(), loss, val))
    assert [(e["step"], e["calls"]) for e in events(config, "train")] == [(2, 4.0), (4, 4.0)]
    assert [(e["step"], e["val_calls"]) for e in events(config, "eval")] == [(4, 3.0)]


# ----------------------------------------------------------------------------- out of memory (13)


def out_of_memory_above(rows, error=torch.OutOfMemoryError):
    """A forward pre-hook that fails like an allocator for training batches over ``rows``."""

    def hook(module, args):
        if module.training and args[0].shape[0] > rows:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")

    return hook


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_halves_the_micro_batch_and_keeps_the_losses(make_toy, tmp_path, error):
    """Batch 8 fails until it is cut into micro-batches of 2 (two halvings); each step
    still sees the same 8 windows, so the losses equal the run that never ran out of
    memory. Tolerance: the same float32 terms summed in another order (rtol 1e-5)."""
    config = dict(max_steps=6, batch_size=8, grad_accum=2, ckpt_interval=3)
    reference = make_toy()
    want = train(reference, DATA, VAL, settings(tmp_path, "a", **config))
    model = make_toy()
    model.register_forward_pre_hook(out_of_memory_above(2, error))
    got = train(model, DATA, VAL, settings(tmp_path, "b", **config))
    assert [s for s, _ in got.train_losses] == [s for s, _ in want.train_losses]
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in got.train_losses]),
        torch.tensor([loss for _, loss in want.train_losses]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert [s for s, _ in got.val_losses] == [s for s, _ in want.val_losses]
    assert [v for _, v in got.val_losses] == pytest.approx([v for _, v in want.val_losses], 1e-5)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    ooms = events(settings(tmp_path, "b"), "oom")
    assert [(e["step"], e["micro_batch"], e["grad_accum"]) for e in ooms] == [(0, 4, 4), (0, 2, 8)]


def test_out_of_memory_with_one_row_left_and_other_errors_propagate(make_toy, tmp_path):
    model = make_toy()
    model.register_forward_pre_hook(out_of_memory_above(0))  # even one row is too many
    with pytest.raises(torch.OutOfMemoryError):
        train(model, DATA, VAL, settings(tmp_path, "a", batch_size=4))
    assert len(events(settings(tmp_path, "a"), "oom")) == 2  # 4 -> 2 -> 1 row, then give up
    for error in (ValueError, RuntimeError):  # a RuntimeError that is not about memory
        model = make_toy()

        def fail(module, args, error=error):
            raise error("mat1 and mat2 shapes cannot be multiplied")

        model.register_forward_pre_hook(fail)
        with pytest.raises(error, match="shapes cannot"):
            train(model, DATA, VAL, settings(tmp_path, f"b-{error.__name__}"))
        assert events(settings(tmp_path, f"b-{error.__name__}"), "oom") == []


def test_out_of_memory_on_supervised_batches_needs_their_split(make_toy, tmp_path):
    """Only the loss knows which rows belong together (DPO's chosen and rejected halves):
    supervised batches are cut after an out-of-memory error only with ``Supervised.split``."""

    class Windows:
        def __init__(self):
            self.windows = TrainBatches(DATA, 4, 8, seed=0)

        def next_batch(self):
            return {"ids": self.windows.next_batch()}

        def state_dict(self):
            return self.windows.state_dict()

        def load_state_dict(self, state):
            self.windows.load_state_dict(state)

    def loss(model, batch, autocast, keep=1.0):
        total, count = trainer_module._next_token_loss(model, batch["ids"], autocast)
        return total, torch.tensor(count)

    def split(batch, n):
        return [({"ids": part}, w) for part, w in trainer_module.split_rows(batch["ids"], n)]

    config = settings(tmp_path, "a", max_steps=4, batch_size=4)
    want = train(make_toy(), None, None, config, supervised=Supervised(Windows(), loss))
    model = make_toy()
    model.register_forward_pre_hook(out_of_memory_above(2))
    config = settings(tmp_path, "b", max_steps=4, batch_size=4)
    got = train(model, None, None, config, supervised=Supervised(Windows(), loss, split=split))
    assert [s for s, _ in got.train_losses] == [s for s, _ in want.train_losses]
    assert [v for _, v in got.train_losses] == pytest.approx([v for _, v in want.train_losses])
    model = make_toy()
    model.register_forward_pre_hook(out_of_memory_above(2))
    with pytest.raises(torch.OutOfMemoryError):
        train(model, None, None, settings(tmp_path, "c"), supervised=Supervised(Windows(), loss))


def test_supervised_runs_count_every_token_processed_and_the_supervised_ones(make_toy, tmp_path):
    """Fine-tuning's tokens/s counts every real token fed to the model (prompt and
    response, padding aside), with the tokens the loss is on beside it. Each batch here:
    rows of 6 and 3 real tokens (9 processed; 3 of padding not counted), of which 2 + 1
    are labelled (3 supervised); 2 micro-batches a step -> 18 and 6 per step. A resume
    carries both counts on."""
    from lmlab.finetune.sft import sft_loss

    ignore = -100
    batch = {
        "ids": torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]]),
        "labels": torch.tensor([[ignore] * 4 + [5, 6], [ignore, ignore, 9] + [ignore] * 3]),
        "mask": torch.tensor([[True] * 6, [True] * 3 + [False] * 3]),
    }

    class Batches:
        def next_batch(self):
            return dict(batch)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def run(max_steps, resume="never"):
        config = settings(
            tmp_path, max_steps=max_steps, log_interval=2, grad_accum=2, resume=resume
        )
        train(make_toy(), None, None, config, supervised=Supervised(Batches(), sft_loss))
        return events(config, "train")

    logged = run(4)
    assert [(e["step"], e["tokens"], e["sup_tokens"]) for e in logged] == [(2, 36, 12), (4, 72, 24)]
    for e in logged:  # the same seconds divide both counts
        assert e["tokens_per_s"] == pytest.approx(3 * e["sup_tokens_per_s"], rel=1e-9)
    resumed = run(6, resume="auto")
    assert (resumed[-1]["step"], resumed[-1]["tokens"], resumed[-1]["sup_tokens"]) == (6, 108, 36)


def test_token_windows_count_batch_times_seq_len_per_micro_batch(make_toy, tmp_path):
    config = settings(tmp_path, max_steps=2, log_interval=1, grad_accum=3)
    train(make_toy(), DATA, None, config)
    logged = events(config, "train")
    assert [e["tokens"] for e in logged] == [4 * 8 * 3, 2 * 4 * 8 * 3]
    assert "sup_tokens" not in logged[0]
