"""The model contract (``lmlab.models.contract``) over every model lmlab can make or load.

Each case is a model from a registered family, a pretrained loader (GGUF, Hugging Face
folders of every supported architecture, MiniLM) or a PEFT/quantized variant. A causal LM
must decode, give a perplexity and score continuations through the public entry points; a
model that cannot must get one ConfigError line naming its family and what was asked,
never a TypeError from deep inside or a number computed from hidden states read as logits.
"""

import math

import pytest
import torch
import transformers

import lmlab
from hf_models import tiny_bart, tiny_llama, tiny_t5
from lmlab.checkpoint.hf import load_hf
from lmlab.checkpoint.seq2seq import load_hf_seq2seq
from lmlab.errors import ConfigError
from lmlab.eval.scoring import score_token_pairs
from lmlab.finetune import LoRAConfig, PrefixTuning, PromptTuning, apply_adapters, apply_lora
from lmlab.finetune.run import prepare_method
from lmlab.generate import SamplingParams, generate_ids
from lmlab.generate.likelihood import perplexity, token_nll
from lmlab.models import abilities, build_model, families, get_preset, require_causal_lm
from lmlab.models.contract import family_name
from lmlab.quant import quantize_model

V = 40
TINY = {
    "transformer": {**get_preset("llama-small"), "n_layers": 1, "d_model": 32, "n_heads": 4},
    "bigram": {"family": "bigram"},
    "mlp": {**get_preset("mlp-char"), "d_model": 8, "d_ff": 16},
    "bag": {**get_preset("bag-char"), "d_model": 8, "d_ff": 16},
    "recurrent": {**get_preset("lstm-char"), "d_model": 16, "n_layers": 1},
    "ngram": {**get_preset("ngram-char"), "order": 3},
    "encoder": {"family": "encoder", "d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64},
    "seq2seq": {
        "family": "seq2seq",
        "d_model": 16,
        "n_heads": 2,
        "n_encoder_layers": 1,
        "n_decoder_layers": 1,
        "d_ff": 32,
    },
}
KINDS = {"encoder": "encoder", "seq2seq": "seq2seq"}  # family -> kind; the rest: causal_lm


def family_model(name):
    spec = {**TINY[name], "vocab_size": V}
    model = build_model(spec).eval()
    if name == "ngram":
        model.fit(torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(0)))
    return model


def gpt2_folder(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    return tmp_path


def llama_like_folder(kind):
    def make(tmp_path):
        tiny_llama(kind, vocab_size=V, n_layers=1).save_pretrained(tmp_path)
        return tmp_path

    return make


def saved(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return tmp_path


def transformer():
    return family_model("transformer")


# name -> a function of tmp_path returning (model, expected kind)
CASES = {f"family-{name}": (lambda tmp_path, n=name: family_model(n)) for name in TINY}
CASES |= {
    "hf-gpt2": lambda tmp_path: load_hf(gpt2_folder(tmp_path))[0],
    **{
        f"hf-{k}": (lambda tmp_path, k=k: load_hf(llama_like_folder(k)(tmp_path))[0])
        for k in ("llama", "mistral", "qwen2")
    },
    **{
        f"hf-{name}": (lambda tmp_path, make=make: load_hf_seq2seq(saved(make(), tmp_path))[0])
        for name, make in (("t5", tiny_t5), ("bart", tiny_bart))
    },
    "peft-lora": lambda tmp_path: apply_lora(transformer(), LoRAConfig(r=2, targets=("q_proj",))),
    "peft-qlora": lambda tmp_path: prepare_method(transformer(), "qlora", LoRAConfig(r=2)),
    "peft-adapter": lambda tmp_path: apply_adapters(transformer(), bottleneck=4),
    "peft-prompt": lambda tmp_path: PromptTuning(transformer(), n_tokens=3),
    "peft-prefix": lambda tmp_path: PrefixTuning(transformer(), n_tokens=3),
    "peft-bitfit": lambda tmp_path: prepare_method(family_model("recurrent"), "bitfit"),
    "quant-int8": lambda tmp_path: quantize_model(transformer(), "int8"),
    "quant-int4": lambda tmp_path: quantize_model(transformer(), "int4"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_model_decodes_and_scores_or_says_why_not(case, tmp_path):
    model = CASES[case](tmp_path).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    if abilities(model).kind != "causal_lm":
        assert case in ("family-encoder", "family-seq2seq", "hf-t5", "hf-bart")
        return check_refused(model)
    out = generate_ids(model, [ids[:4]], SamplingParams(max_new_tokens=3, seed=0, temperature=1))
    assert len(out[0]) == 3 and all(0 <= t < vocab for t in out[0])
    nll = token_nll(model, ids)
    assert nll.shape == (11,) and torch.isfinite(nll).all()
    assert math.isclose(perplexity(model, ids), math.exp(nll.mean().item()), rel_tol=1e-5)
    (scored,) = score_token_pairs(model, [(ids[:5], ids[5:8])])
    # the continuation's log-likelihood is the sum of its tokens' surprisals (same windows)
    assert scored.logprob == pytest.approx(-nll[4:7].sum().item(), rel=1e-4, abs=1e-4)


def check_refused(model):
    """Every entry point that needs next-token logits refuses the encoder in one line."""
    ids = [3, 4, 5, 6]
    calls = {
        "generating text": lambda: generate_ids(model, [ids], SamplingParams(max_new_tokens=2)),
        "perplexity": lambda: perplexity(model, ids),
        "scoring continuations": lambda: score_token_pairs(model, [(ids[:2], ids[2:])]),
        "fine-tuning": lambda: prepare_method(model, "lora"),
    }
    for what, call in calls.items():
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and what in message, message
        assert family_name(model) in message, message


def test_minilm_is_refused_where_a_causal_lm_is_needed():
    """The defect found by hand: perplexity on MiniLM returned about 34 (hidden states read
    as logits) and generate died with a TypeError about ``mask``."""
    lm = lmlab.load("minilm")
    for call in (lambda: lm.perplexity("a small test"), lambda: lm.generate("a small test")):
        with pytest.raises(ConfigError, match="encoder"):
            call()
    check_refused(lm.model)
    assert lm.embed("a small test").shape == (1, 384)  # what it is for still works


@pytest.mark.slow
def test_smollm2_gguf_decodes_and_scores():
    lm = lmlab.load("smollm2")
    assert abilities(lm.model).kind == "causal_lm" and abilities(lm.model).cache
    ids = lm.tokenizer.encode("The capital of France is")
    assert torch.isfinite(token_nll(lm.model, ids)).all()
    assert len(generate_ids(lm.model, [ids], SamplingParams(max_new_tokens=2))[0]) == 2


def test_ngram_cannot_be_fine_tuned_and_says_so():
    with pytest.raises(ConfigError, match=r"fine-tuning \(lora\) needs a model trained by grad"):
        prepare_method(family_model("ngram"), "lora")


def test_every_registered_family_has_a_case_and_declares_its_abilities():
    assert set(families()) == set(TINY)
    for name in families():
        found = abilities(family_model(name))
        assert found is type(family_model(name)).abilities
        assert found.kind == KINDS.get(name, "causal_lm")


def test_an_undeclared_module_is_a_causal_lm_read_off_its_structure():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    found = require_causal_lm(Plain(), "anything")
    assert found.kind == "causal_lm" and found.gradients and not found.cache
    with pytest.raises(ConfigError, match="expected a model"):
        require_causal_lm("not a model", "perplexity")
