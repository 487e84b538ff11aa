import json
import os

import pytest
import torch
from safetensors import safe_open

from hf_models import built_on_meta_only
from lmlab.checkpoint import io
from lmlab.checkpoint.io import (
    COMPLETE_FILE,
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_train_state,
    load_weights,
    remove_stale_temporaries,
    rotate_checkpoints,
    save_checkpoint,
)
from lmlab.errors import CheckpointError
from lmlab.models import build_model, get_preset


def tiny_spec(**overrides):
    spec = {**get_preset("gpt-char-tiny"), "vocab_size": 32, "d_model": 32, "n_layers": 2}
    return {**spec, "n_heads": 2, "d_ff": 64, "max_seq_len": 16, **overrides}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_spec(**overrides))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


class FakeTokenizer:
    """Duck-typed: a tokenizer is anything with save(directory) (and maybe to_config)."""

    def save(self, directory):
        (directory / "tokenizer.json").write_text('{"kind": "fake"}')


def test_save_then_load_is_bit_exact(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "ckpt", model, extra_config={"note": "hello"})
    loaded, tokenizer, config = load_model(path)
    assert_same_weights(loaded, model)
    assert tokenizer is None
    assert config["note"] == "hello" and config["model"]["family"] == "transformer"
    assert not loaded.training


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model())
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert "tok_emb.weight" in keys and "lm_head.weight" not in keys
    loaded, _, _ = load_model(path)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    untied = tiny_model(tie_embeddings=False)
    path = save_checkpoint(tmp_path / "untied", untied)
    assert_same_weights(load_model(path)[0], untied)


def test_bf16_model_loads_as_bf16_unless_asked(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    path = save_checkpoint(tmp_path / "ckpt", model)
    assert_same_weights(load_model(path)[0], model)
    as_float = load_model(path, dtype=torch.float32)[0]
    assert as_float.tok_emb.weight.dtype == torch.float32
    assert torch.equal(as_float.tok_emb.weight, model.tok_emb.weight.float())


def test_model_weights_contain_no_pickle(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model(), train_state={"step": 3})
    raw = (path / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw data
    assert header["tok_emb.weight"]["dtype"] == "F32"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [COMPLETE_FILE, CONFIG_FILE, WEIGHTS_FILE, TRAIN_STATE_FILE]
    )

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load_model must not call torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    load_model(path)


def test_tokenizer_saved_and_reloaded(tmp_path):
    from lmlab.data.tokenizers import CharTokenizer

    tokenizer = CharTokenizer.train("hello world")
    path = save_checkpoint(tmp_path / "ckpt", tiny_model(), tokenizer=tokenizer)
    _, loaded, config = load_model(path)
    assert config["tokenizer"]["kind"] == "char"
    assert loaded.encode("hello") == tokenizer.encode("hello")
    fake = save_checkpoint(tmp_path / "fake", tiny_model(), tokenizer=FakeTokenizer())
    assert json.loads((fake / "tokenizer.json").read_text()) == {"kind": "fake"}
    assert io.read_config(fake)["tokenizer"] == {"kind": "FakeTokenizer"}


def test_load_weights_keeps_parameters_and_optimizer_valid(tmp_path):
    source = tiny_model(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", source)
    model = tiny_model(seed=2)
    params_before = list(model.parameters())
    load_weights(model, path)
    assert all(a is b for a, b in zip(params_before, model.parameters()))
    assert_same_weights(model, source)


def test_run_dir_loads_the_newest_complete_checkpoint(tmp_path):
    for step in (1, 2, 10):
        save_checkpoint(checkpoint_dir(tmp_path, step), tiny_model(seed=step))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000001",
        "step-00000002",
        "step-00000010",
    ]
    assert_same_weights(load_model(tmp_path)[0], tiny_model(seed=10))


def _make_partial(path):
    (path / COMPLETE_FILE).unlink()
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def test_partial_newest_checkpoint_is_skipped(tmp_path):
    save_checkpoint(checkpoint_dir(tmp_path, 1), tiny_model(seed=1))
    newest = save_checkpoint(checkpoint_dir(tmp_path, 2), tiny_model(seed=2))
    _make_partial(newest)
    with pytest.warns(
        UserWarning, match="skipping incomplete checkpoint .*step-00000002.*no COMPLETE"
    ):
        assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)
    with pytest.warns(UserWarning):
        assert_same_weights(load_model(tmp_path)[0], tiny_model(seed=1))
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 1)]
    with pytest.raises(CheckpointError, match="step-00000002.* is incomplete: no COMPLETE"):
        load_model(newest)


def test_truncated_weights_behind_a_marker_are_detected(tmp_path):
    save_checkpoint(checkpoint_dir(tmp_path, 1), tiny_model(seed=1))
    newest = save_checkpoint(checkpoint_dir(tmp_path, 2), tiny_model(seed=2))
    weights = newest / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])  # disk trouble after a complete save
    with pytest.warns(UserWarning, match="model.safetensors has .* bytes, COMPLETE says"):
        assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    model = tiny_model()
    previous = save_checkpoint(checkpoint_dir(tmp_path, 1), model)

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 torn")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(checkpoint_dir(tmp_path, 2), model, train_state={"step": 2})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000001"]  # temp removed
    assert latest_checkpoint(tmp_path) == previous
    assert_same_weights(load_model(tmp_path)[0], model)


def test_crash_replacing_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    old = tiny_model(seed=1)
    path = save_checkpoint(checkpoint_dir(tmp_path, 5), old)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # killed between moving the old one aside and the new one in
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model(seed=2))
    monkeypatch.setattr(os, "rename", real_rename)
    assert latest_checkpoint(tmp_path) is None  # the old one sits under a hidden name...
    remove_stale_temporaries(tmp_path)  # ...and is put back at the next start
    assert_same_weights(load_model(tmp_path)[0], old)


def test_hard_crash_leftovers_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(checkpoint_dir(tmp_path, 1), tiny_model())
    torn = tmp_path / "checkpoints" / ".step-00000002.tmp-deadbeef"
    torn.mkdir()
    (torn / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 1)]
    assert remove_stale_temporaries(tmp_path) == [torn]
    assert not torn.exists()


def test_saving_again_replaces_the_checkpoint(tmp_path):
    path = save_checkpoint(checkpoint_dir(tmp_path, 3), tiny_model(seed=1))
    save_checkpoint(path, tiny_model(seed=2))
    assert_same_weights(load_model(path)[0], tiny_model(seed=2))
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000003"]


def test_rotation_keeps_n_newest(tmp_path):
    model = tiny_model()
    for step in range(1, 6):
        save_checkpoint(checkpoint_dir(tmp_path, step), model)
    _make_partial(save_checkpoint(checkpoint_dir(tmp_path, 6), model))
    deleted = rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step-00000001", "step-00000002", "step-00000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert checkpoint_dir(tmp_path, 6).exists()  # incomplete ones are left for inspection
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "step-00000004",
        "step-00000005",
        "step-00000006",
    ]


def test_rotation_keeps_the_best(tmp_path):
    model = tiny_model()
    for step, val_loss in [(1, 3.0), (2, 1.5), (3, 2.0), (4, 2.5), (5, None)]:
        extra = {"train": {"val_loss": val_loss}}
        save_checkpoint(checkpoint_dir(tmp_path, step), model, extra_config=extra)
    rotate_checkpoints(tmp_path, keep_last=1, keep_best=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step-00000002",
        "step-00000003",
        "step-00000005",
    ]
    with pytest.raises(CheckpointError, match="keep_last=0"):
        rotate_checkpoints(tmp_path, keep_last=0)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="'.*nowhere' does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="neither a checkpoint directory .* nor a run"):
        load_model(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda raw: raw[:-8], "truncated or corrupt: its header describes"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "header of 1000000000 bytes"),
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "corrupt header"),
    ],
)
def test_corrupt_safetensors_names_the_file(tmp_path, corrupt, message):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model())
    weights = path / WEIGHTS_FILE
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(CheckpointError, match="model.safetensors") as info:
        load_weights(tiny_model(), path)
    assert message in str(info.value)


def test_overlapping_offsets_name_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model())
    weights = path / WEIGHTS_FILE
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    first, second = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]  # overlaps `first`
    text = json.dumps(header).encode()
    text += b" " * (n - len(text))  # same header length: only the offsets are wrong
    weights.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(tiny_model(), path)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model())
    config = json.loads((path / CONFIG_FILE).read_text())
    config["model"]["vocab_size"] = 40  # config.json edited to disagree with the weights
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "model.safetensors" in message and "'tok_emb.weight'" in message
    assert "(32, 32)" in message and "(40, 32)" in message


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model(bias=False))
    with pytest.raises(CheckpointError, match="has no tensor 'blocks.0.attn_norm.bias'"):
        load_weights(tiny_model(bias=True), path)
    path = save_checkpoint(tmp_path / "ckpt2", tiny_model(bias=True))
    with pytest.raises(CheckpointError, match="tensors the model does not have: .*bias"):
        load_weights(tiny_model(bias=False), path)


def test_train_state_round_trip_and_refuses_pickled_objects(tmp_path):
    state = {"step": 7, "rng": torch.get_rng_state(), "nested": {"a": [1, 2.5, "x", None]}}
    path = save_checkpoint(tmp_path / "ckpt", tiny_model(), train_state=state)
    loaded = load_train_state(path)
    assert loaded["step"] == 7 and loaded["nested"] == state["nested"]
    assert torch.equal(loaded["rng"], state["rng"])

    marker = tmp_path / "side_effect"
    torch.save({"evil": _Payload(str(marker))}, path / TRAIN_STATE_FILE)
    with pytest.raises(CheckpointError, match="train_state.pt.*weights_only"):
        load_train_state(path)
    assert not marker.exists()


class _Payload:
    """Unpickling this would create a file: the load must refuse before that happens."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- item 29


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path, bad):
    model = tiny_model()
    with torch.no_grad():
        model.blocks[1].mlp.up_proj.weight[3, 4] = bad
        model.norm.weight[0] = -bad
    path = save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and str(path / WEIGHTS_FILE) in message
    assert "non-finite weights (NaN or inf) in 2 tensor(s)" in message
    assert "blocks.1.mlp.up_proj.weight" in message and "'norm.weight'" not in message
    assert "norm.weight" in message
    with pytest.raises(CheckpointError, match="non-finite"):
        load_weights(tiny_model(), path)  # init_from and resume read the same way


@pytest.mark.parametrize(
    ("n_chars", "message"),
    [
        (40, r"tokenizer has 40 token ids but the model's vocab_size is 32: ids 32\.\.39 have no"),
        (30, None),  # two padding rows: normal (nanoGPT pads GPT-2's 50,257 to 50,304)
        (8, None),
    ],
)
def test_a_tokenizer_that_does_not_belong_to_the_model_is_refused_at_load(
    tmp_path, n_chars, message
):
    from lmlab.data.tokenizers import CharTokenizer

    chars = "".join(chr(ord("A") + i) for i in range(n_chars))
    path = save_checkpoint(tmp_path / "ckpt", tiny_model(), tokenizer=CharTokenizer(chars))
    if message is None:
        assert load_model(path)[1].vocab_size == n_chars
        return
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]
)
def test_is_finite_sees_nan_in_every_float_dtype_and_ignores_integers(dtype):
    assert io.is_finite(torch.ones(3, dtype=dtype))
    assert not io.is_finite(torch.tensor([1.0, float("nan")]).to(dtype))
    assert io.is_finite(torch.tensor([-1, 2**40]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"d_model": 196_608},
            r"'tok_emb.weight' has shape \(32, 32\), but the model config.json describes "
            r"expects \(32, 196608\)",
        ),
        ({"n_layers": 50_000_000}, "describes a 50000000-layer model, but .* holds only"),
    ],
    ids=["d_model", "n_layers"],
)
def test_a_spec_promising_a_larger_model_is_refused_before_building(
    tmp_path, monkeypatch, change, message
):
    path = save_checkpoint(tmp_path / "ckpt", tiny_model())
    config = json.loads((path / CONFIG_FILE).read_text())
    config["model"].update(change)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    built_on_meta_only(monkeypatch, io)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_run_saved_with_the_older_tokenizer_file_still_loads(tmp_path):
    """Checkpoints written before tokenizer.json became a Hugging Face file (lmlab's own
    {"kind": "char", ...}, no tokenizer_config.json) load with the same tokenizer."""
    import lmlab
    from lmlab.data.tokenizers import CharTokenizer

    tok = CharTokenizer.train("to be or not\n")
    torch.manual_seed(0)
    ckpt = save_checkpoint(checkpoint_dir(tmp_path, 5), build_model(tiny_spec()), tokenizer=tok)
    (ckpt / "tokenizer_config.json").unlink()
    old = {"kind": "char", "chars": tok.chars, "unk": False}
    (ckpt / "tokenizer.json").write_text(json.dumps(old))
    marker = json.loads((ckpt / COMPLETE_FILE).read_text())
    del marker["files"]["tokenizer_config.json"]
    (ckpt / COMPLETE_FILE).write_text(json.dumps(marker))
    lm = lmlab.load(tmp_path, device="cpu")
    assert isinstance(lm.tokenizer, CharTokenizer) and lm.tokenizer.chars == tok.chars
    assert lm.tokenizer.encode("not to be") == tok.encode("not to be")
    assert lm.chat_template is None


def test_checkpoint_files_have_ordinary_permissions(tmp_path):
    """safetensors' save_file makes 0600 files; a checkpoint's are what open() makes."""
    import stat

    from lmlab.data.tokenizers import CharTokenizer

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", tiny_model(), CharTokenizer.train("ab"), {"x": 1})
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert WEIGHTS_FILE in modes and set(modes.values()) == {0o644}, modes
