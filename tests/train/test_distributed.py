"""Distributed training on two CPU processes (gloo, 127.0.0.1): DDP and FSDP2 reproduce a
single process with the same global batch, FSDP2 shards the parameters, a run saved on 2
ranks resumes on 1, LoRA trains under both; gradient checkpointing changes no gradient.

The two-process runs happen once (``two_ranks``, module scope: one spawn, four runs of
50 steps); each test checks one property of them.
"""

import json

import pytest
import torch

import lmlab
from distributed_runs import (
    SHORT,
    VOCAB,
    finetune_ranks,
    lr_for,
    run_config,
    run_finetune,
    spawn,
    tiny_model,
    train_scenarios,
    walk_tokens,
    write_finetune_base,
)
from lmlab.checkpoint.io import checkpoint_dir, load_train_state
from lmlab.data import TokenShards, write_shards
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.train import TrainConfig, train
from lmlab.train.batches import ShardBatches
from lmlab.train.distributed import DCP_DIR, Ranks, check_grad_accum, checkpoint_blocks

pytestmark = pytest.mark.distributed

# Float32 losses of the same global batch, summed in another order (two ranks' gradients
# averaged by an all-reduce instead of accumulated): 50 AdamW steps stay within 1e-5.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """{scenario: [rank 0's record, rank 1's record]} of ``train_scenarios`` on 2 ranks."""
    root = tmp_path_factory.mktemp("ranks")
    spawn(train_scenarios, 2, str(root))
    records = {}
    for name in ("ddp", "fsdp", "lora-ddp", "lora-fsdp", "fsdp-bf16"):
        records[name] = [json.loads((root / f"{name}-rank{r}.json").read_text()) for r in range(2)]
    return root, records


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process runs with the same global batch (grad_accum=2 in one process)."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for name, lora, steps in (("plain", False, 50), ("short", False, SHORT), ("lora", True, SHORT)):
        model = tiny_model(lora=lora)
        config = run_config(root / name, lr=lr_for(lora), max_steps=steps)
        result = train(model, walk_tokens(), None, config)
        runs[name] = (result.train_losses, model)
    return runs


def losses(record) -> list[float]:
    return [loss for _, loss in record["losses"]]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_over_50_steps(two_ranks, one_process, parallel):
    _, records = two_ranks
    expected = [loss for _, loss in one_process["plain"][0]]
    assert len(expected) == 50
    for record in records[parallel]:  # every rank logs the same (global) loss
        assert [step for step, _ in record["losses"]] == list(range(1, 51))
        assert losses(record) == pytest.approx(expected, abs=TOLERANCE, rel=0)
    assert expected[-1] < expected[0] - 0.5  # it learned something


def test_fsdp_mixed_precision_computes_in_bf16_and_keeps_float32_weights(two_ranks, one_process):
    _, records = two_ranks
    fp32 = [loss for _, loss in one_process["short"][0]]
    for record in records["fsdp-bf16"]:
        assert record["dtypes"] == ["torch.float32"]
        bf16 = losses(record)
        assert bf16 != pytest.approx(fp32, abs=1e-6)  # bf16 rounding shows ...
        assert bf16 == pytest.approx(fp32, abs=0.05)  # ... and the run still learns alike


def test_fsdp_holds_half_the_parameter_bytes_per_rank(two_ranks):
    _, records = two_ranks
    full = records["fsdp"][0]["full_param_bytes"]
    held = [record["param_bytes"] for record in records["fsdp"]]
    assert sum(held) == full  # every element on exactly one rank
    for part in held:
        assert 0.4 * full <= part <= 0.6 * full
    assert [record["param_bytes"] for record in records["ddp"]] == [full, full]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_saved_on_two_ranks_resumes_on_one(two_ranks, tmp_path, parallel):
    root, records = two_ranks
    saved = checkpoint_dir(root / parallel, 25)
    assert (saved / DCP_DIR).is_dir()
    assert load_train_state(saved)["data"]["index"] > 0  # the global stream's position
    result = train(
        tiny_model(seed=9),  # other initial weights: everything must come from the checkpoint
        walk_tokens(),
        None,
        run_config(tmp_path / "resumed", resume=str(saved)),
    )
    continued = dict(records[parallel][0]["losses"])
    resumed = dict(result.train_losses)
    assert sorted(resumed) == list(range(26, 51))
    assert resumed[26] == pytest.approx(continued[26], abs=1e-6, rel=0)
    assert [resumed[s] for s in range(26, 51)] == pytest.approx(
        [continued[s] for s in range(26, 51)], abs=TOLERANCE, rel=0
    )


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_trains_under_two_ranks_like_one_process(two_ranks, one_process, parallel):
    _, records = two_ranks
    expected, model = one_process["lora"]
    for record in records[f"lora-{parallel}"]:
        assert losses(record) == pytest.approx([v for _, v in expected], abs=TOLERANCE, rel=0)
        assert losses(record)[-1] < losses(record)[0] - 0.05
    if parallel == "ddp":  # only the LoRA matrices changed
        changed = records["lora-ddp"][0]["changed"]
        lora_names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert changed == lora_names and all(".lora_" in n for n in changed)


def test_grad_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(4))
    grads = []
    for wrap in (False, True):
        model = tiny_model(seed=2)
        if wrap:
            assert checkpoint_blocks(model) == 2
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


@pytest.fixture
def shards(tmp_path):
    """3,000 tokens of ``walk_tokens`` in shards of 700 (the last one 200)."""
    folder = write_shards(tmp_path / "shards", walk_tokens(3000), VOCAB, shard_tokens=700)
    return TokenShards(folder)


def test_token_shards_hold_the_stream(shards):
    assert [len(s) for s in shards.shards] == [700, 700, 700, 700, 200]
    assert shards.vocab_size == VOCAB
    joined = [int(t) for s in shards.shards for t in s]
    assert joined == walk_tokens(3000).tolist()


def test_shard_stream_is_split_by_rank_and_resumes_mid_shard(shards):
    def stream(rank=0, world=1, workers=0):
        return ShardBatches(shards, 3, 8, seed=5, rank=rank, world_size=world, workers=workers)

    one = stream()
    alone = [one.next_batch() for _ in range(8)]
    ranks = [stream(0, 2), stream(1, 2, workers=2)]
    for i in range(4):  # rank r gets global batches r, r + 2, ...
        for r in (0, 1):
            assert torch.equal(ranks[r].next_batch(), alone[2 * i + r])
    for batch in alone:  # real windows of the stream: each token the previous + 1 or 2
        assert ((batch[:, 1:] - batch[:, :-1]) % VOCAB).ge(1).all()
        assert ((batch[:, 1:] - batch[:, :-1]) % VOCAB).le(2).all()

    reference = stream(1, 2)
    for _ in range(7):
        reference.next_batch()
    state = reference.state_dict()
    assert 0 < state["batch"] * 3 < 700 // 8  # the windows used so far end inside a shard
    expected = [reference.next_batch() for _ in range(6)]
    resumed = stream(1, 2, workers=2)  # read by two DataLoader workers
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(resumed.next_batch(), want)


@pytest.mark.slow  # DataLoader worker processes take seconds to start and stop
def test_training_on_shards_resumes_exactly(shards, tmp_path):
    def run(out, steps, workers, resume="never"):
        config = run_config(
            out, max_steps=steps, ckpt_interval=3, data_workers=workers, resume=resume
        )
        return train(tiny_model(), shards, None, config).train_losses

    whole = run(tmp_path / "whole", 6, workers=0)
    run(tmp_path / "parts", 3, workers=1)
    rest = run(tmp_path / "parts", 6, workers=1, resume="auto")
    assert rest == whole[3:]


@pytest.mark.slow  # two processes that each load a checkpoint and encode a task
def test_finetune_under_torchrun_trains_like_one_process_and_writes_once(tmp_path):
    write_finetune_base(tmp_path)
    spawn(finetune_ranks, 2, str(tmp_path))
    alone = run_finetune(tmp_path, "alone")
    assert len(alone.train.train_losses) == 10
    records = [json.loads((tmp_path / f"finetune-rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert "parallel='ddp'" in record["fsdp_error"]
        assert [loss for _, loss in record["losses"]] == pytest.approx(
            [loss for _, loss in alone.train.train_losses], abs=TOLERANCE, rel=0
        )
        assert record["val_losses"][-1][1] == pytest.approx(
            alone.train.val_losses[-1][1], abs=TOLERANCE
        )
    assert records[0]["model_dir"] == str(tmp_path / "ddp" / "model")  # rank 0 writes it
    assert records[1]["model_dir"] is None
    tuned = lmlab.load(records[0]["model_dir"])
    assert tuned.tokenizer is not None


def test_bad_distributed_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"grad_accum=3 is invalid on 2 processes.*multiple of 2"):
        check_grad_accum(3, Ranks(rank=0, world_size=2))
    assert check_grad_accum(4, Ranks(rank=1, world_size=2)) == 2
    with pytest.raises(ConfigError, match=r"parallel='zero'.*ddp, fsdp"):
        TrainConfig(parallel="zero")
    with pytest.raises(ConfigError, match="data_workers"):
        TrainConfig(data_workers=-1)
    with pytest.raises(ConfigError, match="grad_checkpoint=True needs a model made of"):
        checkpoint_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(DataNotFoundError, match="holds no shards.json"):
        TokenShards(tmp_path)
    with pytest.raises(ConfigError, match="shard_tokens=1 is invalid"):
        write_shards(tmp_path / "s", [1, 2, 3], VOCAB, shard_tokens=1)
    with pytest.raises(DataError, match="outside"):
        write_shards(tmp_path / "s", [1, 2, VOCAB], VOCAB)
    assert not (tmp_path / "s" / "shards.json").exists()
