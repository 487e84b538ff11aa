"""Base references: which bytes are hashed, and what a checkpoint over a base refuses."""

import hashlib

import pytest
import torch

import lmlab
from builders import tiny_llama
from lmlab.checkpoint.base import attach_base, base_entry, find_base
from lmlab.checkpoint.io import (
    load_model,
    load_weights,
    read_safetensors_header,
    save_checkpoint,
)
from lmlab.errors import CheckpointError
from lmlab.finetune import LoRAConfig, apply_lora


def digest(*files):
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def test_the_hash_covers_the_weight_files_of_each_format(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_llama())
    entry = base_entry(str(tmp_path / "ckpt"))
    assert entry["sha256"] == digest(tmp_path / "ckpt" / "model.safetensors")
    assert entry["source"] == str(tmp_path / "ckpt") and entry["hashed"] == ["model.safetensors"]
    # a run directory: its newest complete checkpoint
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002", tiny_llama(seed=2))
    run = base_entry(str(tmp_path / "run"))
    assert run["sha256"] == digest(tmp_path / "run/checkpoints/step-00000002/model.safetensors")
    # an HF folder of shards: every *.safetensors, sorted by name; a GGUF: the file itself
    shards = tmp_path / "hf"
    shards.mkdir()
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        (shards / name).write_bytes(name.encode())
    (shards / "config.json").write_text("{}")
    assert base_entry(str(shards))["sha256"] == digest(*sorted(shards.glob("*.safetensors")))
    (tmp_path / "m.gguf").write_bytes(b"GGUF...")
    assert base_entry(str(tmp_path / "m.gguf"))["sha256"] == digest(tmp_path / "m.gguf")
    assert base_entry(str(tmp_path / "nothing")) is None


def test_a_checkpoint_over_a_base_stores_the_trained_tensors_and_refuses_another_base(tmp_path):
    save_checkpoint(tmp_path / "base", tiny_llama())
    model = apply_lora(tiny_llama(), LoRAConfig(r=2))
    attach_base(model, base_entry(str(tmp_path / "base")))
    save_checkpoint(tmp_path / "tuned", model)
    stored = read_safetensors_header(tmp_path / "tuned" / "model.safetensors")
    assert stored and all(".lora_" in name for name in stored)
    with pytest.raises(CheckpointError, match="load it with lmlab.load"):
        load_model(tmp_path / "tuned")
    # Resuming into a model that records another base: both hashes named.
    save_checkpoint(tmp_path / "other", tiny_llama(seed=5))
    other = apply_lora(tiny_llama(seed=5), LoRAConfig(r=2))
    attach_base(other, base_entry(str(tmp_path / "other")))
    with pytest.raises(CheckpointError) as error:
        load_weights(other, tmp_path / "tuned")
    for entry in (base_entry(str(tmp_path / "base")), base_entry(str(tmp_path / "other"))):
        assert entry["sha256"] in str(error.value)
    # The same base: only the stored tensors change, the base's stay.
    same = apply_lora(tiny_llama(), LoRAConfig(r=2))
    load_weights(same, tmp_path / "tuned")
    for name, tensor in model.state_dict().items():
        assert torch.equal(same.state_dict()[name], tensor), name


def test_an_invalid_base_entry_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="needs source, path and sha256"):
        find_base({"source": "x"}, "here/config.json")


def test_an_old_full_weight_lora_checkpoint_still_loads(tmp_path):
    """Checkpoints written before base references hold every weight; they load as they
    did, LoRA merged in (float32 merge: within 1e-5 of the unmerged model)."""
    model = apply_lora(tiny_llama(), LoRAConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_checkpoint(tmp_path / "old", model)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    loaded = lmlab.load(tmp_path / "old")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), model(ids), rtol=1e-5, atol=1e-5)
