"""``lmlab tokenize``: characters, bytes, words and BPE side by side on held-out text, and
the from-scratch BPE trainer checked against the ``tokenizers`` library
(``lmlab.data.tokenizer_study.compare_tokenizers``).

lmlab tokenize --out runs/tokenize
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from lmlab.data.corpus import load_corpus
from lmlab.data.tokenizer_study import compare_tokenizers
from lmlab.errors import ConfigError
from lmlab.fileio import atomic_write_json


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=str, default="tinyshakespeare", help="a corpus name or a text file"
    )
    parser.add_argument(
        "--vocab_sizes",
        type=str,
        default="256,512,1024,2048,4096",
        help="comma-separated vocabulary sizes for the word and BPE tokenizers",
    )
    parser.add_argument("--out", type=str, default="runs/tokenize", help="folder for the results")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise ConfigError(f"--vocab_sizes {text!r} is invalid: give integers >= 2, e.g. 256,1024")
    return sizes


def run(args) -> None:
    from matplotlib.figure import Figure  # deferred: slow to import, only for plots

    report = compare_tokenizers(
        load_corpus(args.data), parse_sizes(args.vocab_sizes), progress=True
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "tokenize.json", report)

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for key, label, style in (
        ("bpe_bytes", "byte-level BPE (tokenizers)", "o-"),
        ("bpe_scratch", "BPE from scratch (lmlab.data.bpe)", "s--"),
        ("word", "words", "^-"),
    ):
        rows = report[key]
        left.plot(
            [r["vocab_size"] for r in rows],
            [r["tokens_per_word"] for r in rows],
            style,
            label=label,
        )
    for key, label, color in (("char", "characters", "grey"), ("byte", "bytes", "black")):
        left.axhline(report[key]["tokens_per_word"], ls=":", color=color, label=label)
    left.set(
        xscale="log",
        xlabel="vocabulary size",
        ylabel="tokens per word (held-out text)",
        title="shorter sequences from a bigger vocabulary",
    )
    left.legend(fontsize=8)
    words = report["word"]
    right.plot(
        [r["vocab_size"] for r in words],
        [100 * r["unknown"] for r in words],
        "^-",
        label="words: <unk>",
    )
    right.plot(
        [r["vocab_size"] for r in report["bpe_bytes"]],
        [0.0 for _ in report["bpe_bytes"]],
        "o-",
        label="byte-level BPE: never unknown",
    )
    right.set(
        xscale="log",
        xlabel="vocabulary size",
        ylabel="% of held-out tokens unknown",
        title="what a closed vocabulary cannot say",
    )
    right.legend(fontsize=8)
    sizes = report["vocab_sizes"]
    for ax in (left, right):
        ax.set_xticks(sizes, [str(v) for v in sizes])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(out / "tokenize.png", dpi=100)

    print(
        f"held-out text: {report['held_out_chars']:,} characters, {report['held_out_words']:,} words"
    )
    print(f"{'tokenizer':34s} {'vocab':>6s} {'tokens/word':>11s} {'unknown':>8s}")
    print(
        f"{'characters':34s} {report['char']['vocab_size']:6d} {report['char']['tokens_per_word']:11.2f} {report['char']['unknown']:8.2%}"
    )
    print(f"{'bytes (UTF-8)':34s} {256:6d} {report['byte']['tokens_per_word']:11.2f} {0:8.2%}")
    for key, name in (
        ("word", "words"),
        ("bpe_bytes", "byte-level BPE"),
        ("bpe_scratch", "BPE from scratch"),
    ):
        for r in report[key]:
            print(
                f"{name:34s} {r['vocab_size']:6d} {r['tokens_per_word']:11.2f} {r['unknown']:8.2%}"
            )
    same = all(r["same_merges"] and r["same_encodings"] for r in report["bpe_scratch"])
    times = ", ".join(
        f"{r['vocab_size']}: {r['train_s']:.1f} s vs {r['library_train_s']:.1f} s"
        for r in report["bpe_scratch"]
    )
    print(f"from-scratch BPE: merges and encodings equal to tokenizers' at every size: {same}")
    print(f"training time, plain Python vs the library's Rust: {times}")
    print("first merges: " + " ".join("+".join(m) for m in report["first_merges"]))
    print(f"wrote {out / 'tokenize.json'} and {out / 'tokenize.png'}")
