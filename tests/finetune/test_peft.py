"""PEFT checkpoints: only the trained tensors and a base reference, rebuilt by lmlab.load.

Every method of ``lmlab finetune`` but full and kl trains a tiny Llama for a few steps; its
``model/`` and step checkpoints must be much smaller than the base's weights, name the
base's sha256, and load (``lmlab.load``) to a model whose logits equal the run's own
in-memory model bit for bit (tolerance 0: the same float32 weights through the same
operations; QLoRA re-quantizes the same float base to the same NF4 codes). The merged
export loads in transformers with lmlab's logits.
"""

import hashlib
import shutil

import pytest
import torch
import transformers

import lmlab
from lmlab.api import export_hf
from lmlab.checkpoint.io import read_config, read_safetensors_header, save_checkpoint
from lmlab.cli.main import main
from lmlab.data import BPETokenizer
from lmlab.data.tasks import generate_tasks, write_jsonl
from lmlab.errors import CheckpointError, ConfigError
from lmlab.finetune import LoRAConfig, lora_layers
from lmlab.finetune.run import finetune
from lmlab.models import build_model, get_preset
from lmlab.quant import NF4Linear
from lmlab.train import TrainConfig

PEFT = ["lora", "qlora", "adapter", "prompt", "prefix", "bitfit", "selective"]
LORA = LoRAConfig(r=4, targets=("q_proj", "v_proj", "up_proj"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    rows = generate_tasks(["reverse"], 24, seed=0)
    write_jsonl(rows, root / "tasks.jsonl")
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in rows)
    tok = BPETokenizer.train(text + " ### Instruction: Response:", 300)
    torch.manual_seed(0)
    # A tiny Llama with q, k, v biases (the Qwen2 layout), so that BitFit has biases to train.
    spec = {**get_preset("llama-small"), "vocab_size": tok.vocab_size, "n_layers": 2}
    spec |= {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "qkv_bias": True}
    save_checkpoint(root / "base", build_model(spec).eval(), tokenizer=tok)
    return root


def tune(root, method, base="base", name=None, **kw):
    config = TrainConfig(
        out_dir=str(root / (name or method)),
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        warmup_steps=1,
        eval_interval=1000,
        ckpt_interval=2,
        precision="fp32",
        progress=False,
        seed=0,
    )
    return finetune(
        str(root / base),
        str(root / "tasks.jsonl"),
        method=method,
        max_len=48,
        lora=LORA,
        n_virtual=4,
        bottleneck=8,
        config=config,
        **kw,
    )


def ids_of(lm):
    return torch.tensor([lm.tokenizer.encode("Reverse the word: lamp")])


def sha256(file):
    return hashlib.sha256(file.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", PEFT)
def test_peft_checkpoint_is_small_and_loads_with_the_same_logits(setup, method):
    result = tune(setup, method)
    base_file = setup / "base" / "model.safetensors"
    step = result.out_dir / "checkpoints" / "step-00000002"
    for ckpt in (result.model_dir, step):
        config = read_config(ckpt)
        assert config["base"]["source"] == str(setup / "base")
        assert config["base"]["sha256"] == sha256(base_file)
        # The base holds ~1.6M float32 weights; the trained tensors a few thousand.
        assert (ckpt / "model.safetensors").stat().st_size < base_file.stat().st_size / 10
    stored = read_safetensors_header(result.model_dir / "model.safetensors")
    if method in ("lora", "qlora"):
        assert all(".lora_" in name for name in stored)
    loaded = lmlab.load(result.model_dir)
    ids = ids_of(loaded)
    with torch.no_grad():
        expected = result.lm.model.eval()(ids)
        torch.testing.assert_close(loaded.model(ids), expected, rtol=0, atol=0)
    if method == "qlora":  # the base is NF4 again, under the trained LoRA
        layers = lora_layers(loaded.model)
        assert layers and all(isinstance(m.base, NF4Linear) for m in layers.values())


def test_a_changed_or_missing_base_is_a_one_line_error(setup):
    shutil.copytree(setup / "base", setup / "moving")
    result = tune(setup, "lora", base="moving", name="moving-run")
    before = sha256(setup / "moving" / "model.safetensors")
    torch.manual_seed(1)
    other = build_model(read_config(setup / "moving")["model"]).eval()
    save_checkpoint(setup / "moving", other, tokenizer=lmlab.load(setup / "base").tokenizer)
    with pytest.raises(CheckpointError) as error:
        lmlab.load(result.model_dir)
    message = str(error.value)
    after = sha256(setup / "moving" / "model.safetensors")
    assert "\n" not in message and before in message and after in message
    assert str(setup / "moving") in message
    shutil.rmtree(setup / "moving")
    with pytest.raises(CheckpointError, match=f"base is missing.*{before}"):
        lmlab.load(result.model_dir)


def test_a_qlora_result_works_in_generate_and_eval(setup, capsys):
    result = tune(setup, "qlora", name="qlora-cli")
    model = str(result.model_dir)
    argv = ["--max_new_tokens", "3", "--temperature", "0"]
    assert main(["generate", "--ckpt", model, *argv, "Reverse"]) == 0
    assert main(["eval", "--model", model, "--task", "minimal-pairs", "--limit", "3"]) == 0
    assert "minimal-pairs" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_export_loads_in_transformers_with_the_same_logits(setup, tmp_path, method):
    """transformers' Llama on the exported folder vs lmlab's model: float32, tolerance
    1e-5 (the same weights; attention and norm kernels differ in summation order). For
    QLoRA the reference is the loaded NF4 model itself: merging into the dequantized base
    changes only float rounding, also within 1e-5."""
    result = tune(setup, method, name=f"export-{method}")
    if method == "qlora":
        with pytest.raises(ConfigError, match="--merge"):
            export_hf(result.model_dir, tmp_path / "refused")
    out, notes = export_hf(result.model_dir, tmp_path / "hf", merge=True)
    assert (method == "qlora") == any("dequantized" in note for note in notes)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    lm = lmlab.load(result.model_dir)
    ids = ids_of(lm)
    with torch.no_grad():
        ours = lm.model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_smollm2_lora_checkpoint_is_under_10_mb(tmp_path):
    """LoRA r 16 on SmolLM2 (q and v): 1.8 MB of float32 adapter against 540 MB of base;
    the run's model/ and its step checkpoint stay under 10 MB and load to the same logits
    (bit for bit, LoRA merged on both sides)."""
    write_jsonl(generate_tasks(["arithmetic"], 12, seed=0), tmp_path / "arith.jsonl")
    config = TrainConfig(
        out_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, progress=False, seed=0
    )
    result = finetune(
        "smollm2",
        str(tmp_path / "arith.jsonl"),
        "lora",
        max_len=64,
        lora=LoRAConfig(r=16),
        config=config,
    )
    for ckpt in (result.model_dir, result.train.checkpoint):
        assert (ckpt / "model.safetensors").stat().st_size < 10_000_000
        assert read_config(ckpt)["base"]["source"] == "smollm2"
    loaded = lmlab.load(result.model_dir)
    assert loaded.chat_template is not None
    ids = ids_of(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), result.lm.model(ids), rtol=0, atol=0)
