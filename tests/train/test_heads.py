"""The heads' losses and their resumable batches."""

import torch
import torch.nn.functional as F

from lmlab.data.mlm import IGNORE
from lmlab.models import build_model
from lmlab.train.heads import HeadBatches, collate_rows, head_loss

SPEC = dict(
    family="encoder", vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16
)


def rows(kind):
    out = []
    for n in (3, 5, 4):
        row = {"ids": list(range(1, n + 1)), "token_type_ids": [0] * n}
        if kind == "token":
            row["label"] = [IGNORE] + [i % 3 for i in range(n - 2)] + [IGNORE]
        elif kind == "span":
            row["start"], row["end"] = 1, n - 2
        else:
            row["label"] = n % 2
        out.append(row)
    return out


def test_token_loss_counts_only_labelled_positions():
    torch.manual_seed(0)
    model = build_model({**SPEC, "head": "token", "n_labels": 3})
    batch = collate_rows(rows("token"), pad_id=0)
    loss, count = head_loss(model, batch)
    logits = model.head_logits(
        model(batch["ids"], batch["attention_mask"], batch["token_type_ids"])
    )
    keep = batch["labels"] != IGNORE
    assert int(count) == 1 + 3 + 2  # 3, 5 and 4 tokens, less [CLS] and [SEP] each
    torch.testing.assert_close(
        loss, F.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum")
    )
    # padding and ignored positions get no gradient: changing their labels changes nothing
    batch["labels"][~keep] = IGNORE
    torch.testing.assert_close(head_loss(model, batch)[0], loss)


def test_span_loss_is_the_mean_of_start_and_end_and_ignores_padding():
    torch.manual_seed(0)
    model = build_model({**SPEC, "head": "span"})
    batch = collate_rows(rows("span"), pad_id=0)
    loss, count = head_loss(model, batch)
    start, end = model.head_logits(
        model(batch["ids"], batch["attention_mask"], batch["token_type_ids"])
    )
    want = 0.0
    for i, r in enumerate(rows("span")):  # each row alone, no padding at all
        T = len(r["ids"])
        want += (
            F.cross_entropy(start[i, :T], torch.tensor(r["start"]))
            + F.cross_entropy(end[i, :T], torch.tensor(r["end"]))
        ) / 2
    assert int(count) == 3
    torch.testing.assert_close(loss, want)


def test_sequence_loss_sums_rows():
    torch.manual_seed(0)
    model = build_model({**SPEC, "head": "sequence", "pooler": True, "n_labels": 2})
    batch = collate_rows(rows("sequence"), pad_id=0)
    loss, count = head_loss(model, batch)
    logits = model.head_logits(
        model(batch["ids"], batch["attention_mask"], batch["token_type_ids"])
    )
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"], reduction="sum"))
    assert int(count) == 3


def test_head_batches_are_a_function_of_the_index():
    data = [{"ids": [i + 1], "token_type_ids": [0], "label": i % 2} for i in range(10)]
    a, b = HeadBatches(data, 4, seed=3, pad_id=0), HeadBatches(data, 4, seed=3, pad_id=0)
    first = [a.next_batch()["ids"] for _ in range(5)]
    b.load_state_dict({"index": 3})
    assert torch.equal(b.next_batch()["ids"], first[3])
    # one epoch (two batches of 4 of 10 rows) never repeats a row
    assert len(set(torch.cat(first[:2]).flatten().tolist())) == 8
