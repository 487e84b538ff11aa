"""Load GGUF files (llama.cpp's format) into lmlab's transformer, with their tokenizer.

A GGUF file is one self-describing blob (spec: ggml's ``docs/gguf.md``)::

    magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)          metadata
    tensor_count x (name: string, n_dims: u32, ne: u64 x n_dims,
                    ggml_type: u32, offset: u64)                 tensor infos
    padding to general.alignment (default 32)
    data section: each tensor's bytes at data_start + offset

Strings are a u64 byte length and UTF-8 bytes. ``ne`` lists dimensions fastest-varying
first, so a PyTorch ``[out, in]`` weight is stored as ``ne = [in, out]``: shapes come out
reversed. Tensors may be quantized in blocks (Q8_0: 32 weights share one fp16 scale).

``read_gguf`` parses and validates the whole header itself, checking every count and length
against the bytes the file has left *before* allocating anything, so a corrupt or hostile
file fails with one ``CheckpointError`` (naming the file, and the key or tensor) in time and
memory bounded by the file's size. Dequantization is the ``gguf`` package's
(``gguf.quants.dequantize``), the reference implementation that ships with llama.cpp.

``gguf_to_hf`` turns a ``llama`` file (or a ``gpt2`` one, as ``checkpoint/gguf_export.py``
writes) into a Hugging Face ``LlamaConfig``-style (``GPT2Config``) dict and a float32
state dict in HF names, the canonical intermediate that ``checkpoint/hf.py``
converts to lmlab; ``gguf_tokenizer`` rebuilds the byte-level BPE tokenizer from the
metadata; ``load_gguf`` does all three.

    >>> model, tok, info = load_gguf(pretrained_path("smollm2"))   # doctest: +SKIP
    >>> info["architecture"], info["eos_token"], tok.encode("<|im_start|>user")  # doctest: +SKIP
    ('llama', '<|im_end|>', [1, 4093])

Parity: tests/checkpoint/test_gguf.py compares logits with transformers'
``LlamaForCausalLM`` (tiny random models written with ``gguf.GGUFWriter``, and the real
SmolLM2-135M file) and token ids with transformers' own GGUF tokenizer loader.
"""

from __future__ import annotations

import math
import mmap
import os
import reprlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from torch import nn
from tqdm.auto import tqdm

from lmlab.checkpoint.hf import assign_converted, convert_hf_state_dict, spec_from_hf_config
from lmlab.checkpoint.io import check_finite, check_tokenizer_fits, is_finite
from lmlab.data.tokenizers import BPETokenizer, bytes_to_unicode
from lmlab.devices import empty_on_huge_pages, return_free_memory, use_huge_pages
from lmlab.errors import CheckpointError, DataNotFoundError
from lmlab.models import build_model
from lmlab.quant.int4 import Int4Linear, int4_kernel_available
from lmlab.quant.q8 import Q8_0Embedding, Q8_0Linear, native_q8_0_mm
from lmlab.quant.quantize import set_submodule

MAGIC = b"GGUF"
VERSIONS = (2, 3)
"""GGUF versions read here. Version 1 (2023) used 32-bit lengths and is long gone."""
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
ARCHITECTURES = ("llama", "gpt2")
"""``general.architecture`` values ``gguf_to_hf`` converts (Llama layout, GPT-2)."""

_T = gguf.GGUFValueType
# Scalar value types: struct format (little-endian) of each.
_SCALARS: dict[int, str] = {
    _T.UINT8: "<B",
    _T.INT8: "<b",
    _T.UINT16: "<H",
    _T.INT16: "<h",
    _T.UINT32: "<I",
    _T.INT32: "<i",
    _T.FLOAT32: "<f",
    _T.BOOL: "<B",
    _T.UINT64: "<Q",
    _T.INT64: "<q",
    _T.FLOAT64: "<d",
}
_VALUE_TYPES = {int(t): t.name for t in _T}

# Every ggml type that gguf.quants.dequantize handles: F32 and F16 directly, the rest
# through its table of block formats (BF16, Q4_0 ... Q8_0, the K-quants, the IQ types).
DEQUANTIZABLE: tuple[gguf.GGMLQuantizationType, ...] = tuple(
    sorted(
        {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
        | set(getattr(gguf.quants, "_type_traits", {}))
    )
)


# ----------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    shape: tuple[int, ...]
    """PyTorch order (the file's ``ne`` reversed): a Linear weight is ``(out, in)``."""
    type: gguf.GGMLQuantizationType
    offset: int
    """Absolute byte offset in the file."""
    nbytes: int


@dataclass
class GGUFFile:
    """A validated GGUF header: metadata and tensor locations (tensor data stays on disk)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    """Key -> value: int, float, bool or str; an array of strings is a list, an array of
    numbers a read-only NumPy array (``tokenizer.ggml.token_type``: int32)."""
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def raw(self, name: str, rows: tuple[int, int] | None = None) -> bytearray:
        """The stored bytes of tensor ``name`` (blocks of a quantized type as they are);
        with ``rows`` = (start, stop), those of rows [start, stop) of its first dimension."""
        t = self.tensors[name]
        start, size = 0, t.nbytes
        if rows is not None:
            row_bytes = t.nbytes // t.shape[0]
            start, size = rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        raw = bytearray(size)  # writable, so torch.frombuffer needs no copy of it
        with open(self.path, "rb") as f:
            f.seek(t.offset + start)
            got = f.readinto(raw)
        if got != size:  # the file changed since it was validated
            raise CheckpointError(f"{str(self.path)!r}: tensor {name!r} is truncated")
        return raw

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` as float32 (or rounded once from float32 to ``dtype``), in
        PyTorch shape order (reads only its bytes)."""
        if name not in self.tensors:
            raise CheckpointError(f"{str(self.path)!r} has no tensor {name!r}")
        t = self.tensors[name]
        if t.type not in DEQUANTIZABLE:
            raise CheckpointError(_type_message(self.path, [t]))
        if t.type in _FAST_BLOCK_BYTES:
            return self._dequantize_fast(t, dtype).view(t.shape)
        raw = self.raw(name)
        block, type_size = gguf.GGML_QUANT_SIZES[t.type]
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(
            *t.shape[:-1], t.shape[-1] // block * type_size
        )  # (..., bytes per row): dequantize works row by row
        values = gguf.quants.dequantize(rows, t.type).astype(np.float32, copy=True)
        return torch.from_numpy(values.reshape(t.shape)).to(dtype)

    def _dequantize_fast(self, t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
        """Q8_0, Q4_0 or Q4_1 tensor ``t`` read and dequantized a chunk of blocks at a time:
        besides the float32 result, only a few MB are ever allocated (loading a whole
        model then holds little more than its weights)."""
        size = _FAST_BLOCK_BYTES[t.type]
        # (blocks, 32 weights): each chunk computed in float32 and written rounded to dtype
        out = torch.empty(t.nbytes // size, 32, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            for start in range(0, len(out), _CHUNK_BLOCKS):
                piece = bytearray(min(_CHUNK_BLOCKS, len(out) - start) * size)
                if f.readinto(piece) != len(piece):  # the file changed since it was validated
                    raise CheckpointError(f"{str(self.path)!r}: tensor {t.name!r} is truncated")
                _dequantize_blocks(piece, t.type, out=out[start : start + len(piece) // size])
        return out.view(-1)


def _dequantize_blocks(
    raw: bytes | bytearray, kind: gguf.GGMLQuantizationType, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Q8_0, Q4_0 and Q4_1 (what most small GGUF files hold) dequantized in a few whole-tensor
    torch operations, bit-identical to ``gguf.quants.dequantize`` (tested) and several
    times faster than its row-group loop; None for the other types.

    Blocks of 32 weights, each a float16 scale ``d`` (Q4_1: and a minimum ``m``) then the
    quants. Q8_0: 32 int8, w = d q. Q4_0: 16 bytes whose low nibbles are weights 0-15 and
    high nibbles 16-31, w = d (q - 8). Q4_1: the same nibbles, w = d q + m.
    """
    Q = gguf.GGMLQuantizationType
    if kind not in _FAST_BLOCK_BYTES:
        return None
    head = 4 if kind == Q.Q4_1 else 2  # bytes of float16 scale (and minimum) per block
    size = _FAST_BLOCK_BYTES[kind]
    raw = raw if isinstance(raw, bytearray) else bytearray(raw)  # frombuffer: writable
    blocks = torch.frombuffer(raw, dtype=torch.uint8).view(-1, size)  # (N, size)
    out = torch.empty(blocks.shape[0], 32) if out is None else out  # (N, 32)
    # A chunk of blocks at a time: the temporaries stay a few MB whatever the tensor's
    # size, so a loader dequantizing a whole model holds little beyond the weights.
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start : start + _CHUNK_BLOCKS]
        rows = out[start : start + len(chunk)]
        scales = chunk[:, :head].contiguous().view(torch.float16).float()  # (n, 1 or 2)
        d = scales[:, :1]
        if kind == Q.Q8_0:
            torch.mul(d, chunk[:, head:].contiguous().view(torch.int8).float(), out=rows)
            continue
        packed = chunk[:, head:]  # (n, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()  # (n, 32): weights 0-15, 16-31
        if kind == Q.Q4_0:
            torch.mul(d, q - 8, out=rows)
        else:
            torch.add(d * q, scales[:, 1:], out=rows)
    return out.view(-1)


_FAST_BLOCK_BYTES = {
    gguf.GGMLQuantizationType.Q8_0: 34,
    gguf.GGMLQuantizationType.Q4_0: 18,
    gguf.GGMLQuantizationType.Q4_1: 20,
}
"""Bytes per block of 32 weights of the types ``_dequantize_blocks`` computes."""
_CHUNK_BLOCKS = 1 << 12
"""Blocks of 32 weights dequantized at once (131072 weights: 512 KB float32 temporaries)."""


class _Cursor:
    """Reads little-endian values from a byte buffer, never past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{str(self.path)!r} is not a valid GGUF file: {what}")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos}, but the file has only "
                f"{self.left()} left (truncated or corrupt)"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        self.need(n, f"{what} (a string of {n} bytes)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate a GGUF file's header; tensor data is only bounds-checked.

    Raises ``DataNotFoundError`` for a missing file and ``CheckpointError`` naming the
    problem for anything malformed: bad magic, a version other than 2 or 3, counts or
    lengths larger than the file, unknown value or tensor types, duplicate keys or tensor
    names, misaligned, overlapping or out-of-bounds tensor data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"GGUF file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size < 24:  # magic + version + two counts
        raise CheckpointError(f"{str(path)!r} is not a valid GGUF file: only {size} bytes")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(_Cursor(buf, path))


def _parse(c: _Cursor) -> GGUFFile:
    magic = c.buf[:4]
    if magic != MAGIC:
        raise c.fail(f"it starts with {magic!r}, not the GGUF magic {MAGIC!r}")
    c.pos = 4
    version = c.scalar("<I", "the version")
    if version not in VERSIONS and int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
        raise c.fail("it is a big-endian GGUF; only little-endian files are supported")
    if version not in VERSIONS:
        raise c.fail(f"version {version} is not supported; valid: {', '.join(map(str, VERSIONS))}")
    n_tensors = c.scalar("<Q", "tensor_count")
    n_kv = c.scalar("<Q", "kv_count")
    # The smallest key/value is 13 bytes (empty key, type, one u8); the smallest tensor
    # info 24 (empty name, n_dims, type, offset): counts the file cannot hold are rejected
    # before any loop runs.
    if n_kv * 13 > c.left():
        raise c.fail(f"kv_count {n_kv} is impossible in a file of {c.size} bytes")
    if n_tensors * 24 > c.left():
        raise c.fail(f"tensor_count {n_tensors} is impossible in a file of {c.size} bytes")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        if key in metadata:
            raise c.fail(f"key {key!r} appears twice")
        vtype = c.scalar("<I", f"the type of key {key!r}")
        metadata[key] = _value(c, vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment < 1
        or alignment & (alignment - 1)
    ):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two")

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor {i}")
        if name in names:
            raise c.fail(f"tensor name {name!r} appears twice")
        names.add(name)
        n_dims = c.scalar("<I", f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions; valid: 1 to {MAX_DIMS}")
        ne = [c.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        ttype = c.scalar("<I", f"the type of tensor {name!r}")
        offset = c.scalar("<Q", f"the offset of tensor {name!r}")
        infos.append((name, ne, ttype, offset))

    data_start = -(-c.pos // alignment) * alignment  # round up to the alignment
    data_size = c.size - data_start
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, ttype, offset in infos:
        tensors[name] = _tensor(c, name, ne, ttype, offset, data_start, data_size, alignment)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise c.fail(f"the data of tensors {a.name!r} and {b.name!r} overlap")
    return GGUFFile(c.path, version, metadata, tensors)


def _value(c: _Cursor, vtype: int, key: str) -> Any:
    """One metadata value of type ``vtype``; arrays hold scalars or strings (not arrays)."""
    if vtype in _SCALARS:
        value = c.scalar(_SCALARS[vtype], f"the value of {key!r}")
        if vtype == _T.BOOL:
            if value > 1:
                raise c.fail(f"{key!r} holds bool byte {value}; valid: 0 or 1")
            value = bool(value)
        return value
    if vtype == _T.STRING:
        return c.string(f"the value of {key!r}")
    valid = ", ".join(f"{n} ({v})" for v, n in _VALUE_TYPES.items())
    if vtype == _T.ARRAY:
        itype = c.scalar("<I", f"the item type of array {key!r}")
        count = c.scalar("<Q", f"the length of array {key!r}")
        if itype in _SCALARS:
            fmt = _SCALARS[itype]
            width = struct.calcsize(fmt)
            c.need(count * width, f"array {key!r} of {count} {_VALUE_TYPES[itype]}")
            # A NumPy array, not a list: one Python int per byte would cost 36x the file.
            values = np.frombuffer(c.buf[c.pos : c.pos + count * width], dtype=fmt)
            c.pos += count * width
            if itype == _T.BOOL:
                if (values > 1).any():
                    raise c.fail(f"array {key!r} holds a bool byte other than 0 or 1")
                values = values.astype(bool)
            return values
        if itype == _T.STRING:
            c.need(count * 8, f"array {key!r} of {count} strings")
            return [c.string(f"item {j} of {key!r}") for j in range(count)]
        raise c.fail(
            f"array {key!r} has item type {itype}; valid: {valid} (arrays of arrays are "
            "not supported)"
        )
    raise c.fail(f"key {key!r} has value type {vtype}; valid: {valid}")


def _tensor(c, name, ne, ttype, offset, data_start, data_size, alignment) -> GGUFTensor:
    try:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        valid = ", ".join(t.name for t in gguf.GGML_QUANT_SIZES)
        raise c.fail(f"tensor {name!r} has type {ttype}, not a ggml type; valid: {valid}") from None
    if any(n < 1 for n in ne):
        raise c.fail(f"tensor {name!r} has shape {ne} (ne); every dimension must be >= 1")
    if ne[0] % block:
        raise c.fail(
            f"tensor {name!r} of type {qtype.name} has a row of {ne[0]} values, not a "
            f"multiple of its block size {block}"
        )
    count = math.prod(ne)
    nbytes = count // block * type_size
    if offset % alignment:
        raise c.fail(f"tensor {name!r} has offset {offset}, not a multiple of {alignment}")
    if data_size < 0 or offset + nbytes > data_size:
        raise c.fail(
            f"tensor {name!r} ({qtype.name}, shape {list(reversed(ne))}) needs data bytes "
            f"{offset}..{offset + nbytes}, but the data section has only "
            f"{max(data_size, 0)} bytes (truncated file or bad offset)"
        )
    return GGUFTensor(name, tuple(reversed(ne)), qtype, data_start + offset, nbytes)


def _type_message(path: Path, bad: list[GGUFTensor]) -> str:
    names = ", ".join(f"{t.name} ({t.type.name})" for t in bad[:5])
    valid = ", ".join(t.name for t in DEQUANTIZABLE)
    return (
        f"{str(path)!r}: the gguf package cannot dequantize tensor(s) {names}"
        f"{', ...' if len(bad) > 5 else ''}; valid types: {valid}"
    )


# ----------------------------------------------------------------------------- weights


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: GGUF (interleaved pairs) -> HF (halves).

    HF Llama rotates the two *halves* of each head (``rotate_half``); llama.cpp rotates
    adjacent *pairs*, so its converter reorders each head's rows from ``[x0..x{d/2-1},
    y0..y{d/2-1}]`` to ``[x0, y0, x1, y1, ...]``. For one head of size 4 the GGUF rows
    ``[x0, y0, x1, y1]`` come back as ``[x0, x1, y0, y1]``.

    w: [n_heads * d_head, D] -> same shape.
    """
    out, d_in = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, half, 2, d_in).transpose(1, 2).reshape(out, d_in)


# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(name: str, n_layers: int) -> str | None:
    """``blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        if _block_index(parts[1]) < n_layers:
            return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def _block_index(text: str) -> int | float:
    """``"3" -> 3``; anything that is not a canonical decimal (``"01"``, ``"x"``) -> inf."""
    if text.isascii() and text.isdigit() and str(int(text)) == text:
        return int(text)
    return math.inf


def check_metadata_against_tensors(g: GGUFFile, cfg: dict[str, Any]) -> None:
    """Refuse a file whose metadata describes another model than the tensors it holds.

    Runs before anything is allocated or dequantized, in time and memory proportional to
    the number of tensors (which ``read_gguf`` bounded by the file's size): a 37 KB file
    claiming ``block_count`` 50,000,000 or ``feed_forward_length`` 2**30 fails here, in
    milliseconds, instead of building a model of that size. ``cfg`` is
    ``hf_config_from_gguf(g)``. Each tensor present must have the shape the metadata
    implies (its byte size was checked against its shape and type by ``read_gguf``)::

        token_embd, output      (V, D)      attn_q, attn_output (H*Dh, D), (D, H*Dh)
        *_norm                  (D,)        attn_k, attn_v      (KV*Dh, D)
        ffn_gate, ffn_up        (F, D)      ffn_down            (D, F)
    """
    where, arch = str(g.path), g.metadata["general.architecture"]
    n_layers = cfg["num_hidden_layers"]
    blocks = {_block_index(n.split(".")[1]) for n in g.tensors if n.startswith("blk.")}
    blocks.discard(math.inf)
    if not 1 <= n_layers <= len(blocks):
        raise CheckpointError(
            f"{where!r}: metadata {arch}.block_count is {n_layers}, but the file holds the "
            f"tensors of {len(blocks)} block(s): the metadata does not describe this file"
        )
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    heads = f"{arch}.attention.head_count {H}, head size {Dh}"
    kv_heads = f"{arch}.attention.head_count_kv {KV}, head size {Dh}"
    ff = f"{arch}.feed_forward_length {F}"
    width = f"{arch}.embedding_length {D}"
    expected: dict[str, tuple[tuple[int, ...], str]] = {
        "token_embd.weight": ((V, D), width),
        "output.weight": ((V, D), f"{width}, {V} token embedding rows"),
        "output_norm.weight": ((D,), width),
        "attn_norm.weight": ((D,), width),
        "ffn_norm.weight": ((D,), width),
        "attn_q.weight": ((H * Dh, D), f"{heads}, {width}"),
        "attn_k.weight": ((KV * Dh, D), f"{kv_heads}, {width}"),
        "attn_v.weight": ((KV * Dh, D), f"{kv_heads}, {width}"),
        "attn_output.weight": ((D, H * Dh), f"{heads}, {width}"),
        "ffn_gate.weight": ((F, D), f"{ff}, {width}"),
        "ffn_up.weight": ((F, D), f"{ff}, {width}"),
        "ffn_down.weight": ((D, F), f"{ff}, {width}"),
    }
    for name, t in g.tensors.items():
        leaf = name.split(".", 2)[2] if name.startswith("blk.") and name.count(".") >= 2 else name
        if leaf not in expected or (name.startswith("blk.") != (leaf in _BLOCK_NAMES)):
            continue  # unknown names are gguf_to_hf's to report
        want, why = expected[leaf]
        if t.shape != want:
            raise CheckpointError(
                f"{where!r}: tensor {name!r} has shape {t.shape}, the metadata implies {want} "
                f"({why}): the metadata does not describe this file"
            )


def _meta(g: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Metadata ``key`` checked to be of ``kind``; missing -> ``default`` or an error."""
    if key not in g.metadata:
        if default is ...:
            raise CheckpointError(f"{str(g.path)!r} lacks the metadata key {key!r}")
        return default
    value = g.metadata[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # a whole number written as an integer is fine
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise CheckpointError(
            f"{str(g.path)!r}: metadata {key!r} is {reprlib.repr(value)}, expected "
            f"{getattr(kind, '__name__', kind)}"
        )
    return value


def _f32(x: float) -> float:
    """The shortest decimal that round-trips a float32: 9.999999747e-06 -> 1e-05."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="0"))


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """A Hugging Face ``LlamaConfig``-style dict from the metadata of a ``llama`` file
    (``GPT2Config``-style for a ``gpt2`` one)."""
    arch = _meta(g, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{str(g.path)!r} holds a {arch!r} model; valid architectures: {', '.join(ARCHITECTURES)}"
        )

    def m(key, kind=int, default=...):
        return _meta(g, f"{arch}.{key}", kind, default)

    if arch == "gpt2":
        return _gpt2_config(g, m)

    if m("expert_count", int, 0):
        raise CheckpointError(f"{str(g.path)!r} is a mixture-of-experts model, not supported")
    scaling = m("rope.scaling.type", str, "none")
    if scaling not in ("none", ""):
        raise CheckpointError(
            f"{str(g.path)!r} uses RoPE scaling {scaling!r}; supported: none (plain RoPE)"
        )
    hidden, n_heads = m("embedding_length"), m("attention.head_count")
    if n_heads < 1 or hidden < 1:
        raise CheckpointError(f"{str(g.path)!r}: head_count and embedding_length must be >= 1")
    head_dim = m("attention.key_length", int, hidden // n_heads)
    rope_dim = m("rope.dimension_count", int, head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(
            f"{str(g.path)!r}: rope.dimension_count {rope_dim} != head size {head_dim}; "
            "partial rotary embeddings are not supported"
        )
    if "token_embd.weight" not in g.tensors:
        raise CheckpointError(f"{str(g.path)!r} has no tensor 'token_embd.weight'")
    vocab, emb_dim = (g.tensors["token_embd.weight"].shape + (0,))[:2]
    cfg = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=m("block_count"),
        num_attention_heads=n_heads,
        num_key_value_heads=m("attention.head_count_kv", int, n_heads),
        head_dim=head_dim,
        intermediate_size=m("feed_forward_length"),
        max_position_embeddings=m("context_length", int, 2048),
        rms_norm_eps=_f32(m("attention.layer_norm_rms_epsilon", float, 1e-5)),
        rope_theta=_f32(m("rope.freq_base", float, 10000.0)),
        hidden_act="silu",
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias=False,
        mlp_bias=False,
    )
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        token = _meta(g, f"tokenizer.ggml.{key}", int, None)
        if token is not None:
            cfg[ours] = token
    if emb_dim != hidden:
        raise CheckpointError(
            f"{str(g.path)!r}: token_embd.weight has width {emb_dim}, but embedding_length "
            f"is {hidden}"
        )
    return cfg


def _gpt2_config(g: GGUFFile, m) -> dict[str, Any]:
    """The ``GPT2Config`` dict of a ``gpt2`` file: llama.cpp's GPT-2 computes GELU with the
    tanh approximation (HF's ``gelu_new``) and ties the output to ``token_embd`` when the
    file has no ``output.weight``."""
    if "token_embd.weight" not in g.tensors:
        raise CheckpointError(f"{str(g.path)!r} has no tensor 'token_embd.weight'")
    d = m("embedding_length")
    if d < 1 or m("attention.head_count") < 1:
        raise CheckpointError(f"{str(g.path)!r}: head_count and embedding_length must be >= 1")
    cfg = dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=g.tensors["token_embd.weight"].shape[0],
        n_embd=d,
        n_layer=m("block_count"),
        n_head=m("attention.head_count"),
        n_inner=m("feed_forward_length", int, 4 * d),
        n_positions=m("context_length"),
        layer_norm_epsilon=_f32(m("attention.layer_norm_epsilon", float, 1e-5)),
        activation_function="gelu_new",
        tie_word_embeddings="output.weight" not in g.tensors,
    )
    for key in ("bos_token_id", "eos_token_id"):
        token = _meta(g, f"tokenizer.ggml.{key}", int, None)
        if token is not None:
            cfg[key] = token
    return cfg


# GGUF tensor name (after "blk.N.") -> (HF GPT-2 name after "transformer.h.N.", transpose):
# HF's Conv1D layers store [in, out], GGUF (like nn.Linear) [out, in].
_GPT2_BLOCK_NAMES = {
    f"{ours}.{part}": (f"{theirs}.{part}", part == "weight" and conv)
    for ours, theirs, conv in (
        ("attn_norm", "ln_1", False),
        ("attn_qkv", "attn.c_attn", True),
        ("attn_output", "attn.c_proj", True),
        ("ffn_norm", "ln_2", False),
        ("ffn_up", "mlp.c_fc", True),
        ("ffn_down", "mlp.c_proj", True),
    )
    for part in ("weight", "bias")
}
_GPT2_TOP_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}


def _gpt2_to_hf(g: GGUFFile, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float32 HF GPT-2 state dict of a ``gpt2`` file, every shape checked against the
    metadata before anything is dequantized."""
    D, F, V, L = cfg["n_embd"], cfg["n_inner"], cfg["vocab_size"], cfg["n_layer"]
    where = str(g.path)
    blocks = {_block_index(n.split(".")[1]) for n in g.tensors if n.startswith("blk.")}
    if not 1 <= L <= len(blocks - {math.inf}):
        raise CheckpointError(
            f"{where!r}: metadata gpt2.block_count is {L}, but the file holds the tensors of "
            f"{len(blocks - {math.inf})} block(s): the metadata does not describe this file"
        )
    shapes = {
        "token_embd.weight": (V, D),
        "position_embd.weight": (cfg["n_positions"], D),
        "output.weight": (V, D),
        "output_norm.weight": (D,),
        "output_norm.bias": (D,),
    }
    block = {
        "attn_norm": ((D,), (D,)),
        "attn_qkv": ((3 * D, D), (3 * D,)),
        "attn_output": ((D, D), (D,)),
        "ffn_norm": ((D,), (D,)),
        "ffn_up": ((F, D), (F,)),
        "ffn_down": ((D, F), (D,)),
    }
    for i in range(L):
        for leaf, (w, b) in block.items():
            shapes[f"blk.{i}.{leaf}.weight"], shapes[f"blk.{i}.{leaf}.bias"] = w, b
    unknown = sorted(set(g.tensors) - set(shapes))
    if unknown:
        raise CheckpointError(
            f"{where!r} has tensors a {L}-layer GPT-2 does not use: {', '.join(unknown[:8])}"
        )
    missing = sorted(set(shapes) - set(g.tensors) - {"output.weight"})
    if missing:
        raise CheckpointError(
            f"{where!r} lacks tensors of a {L}-layer GPT-2: {', '.join(missing[:8])}"
        )
    for name, t in g.tensors.items():
        if t.shape != shapes[name]:
            raise CheckpointError(
                f"{where!r}: tensor {name!r} has shape {t.shape}, the metadata implies "
                f"{shapes[name]}: the metadata does not describe this file"
            )
    bad = [t for t in g.tensors.values() if t.type not in DEQUANTIZABLE]
    if bad:
        raise CheckpointError(_type_message(g.path, bad))
    state, nonfinite = {}, []
    for name in g.tensors:
        w = g.dequantize(name)
        if not is_finite(w):
            nonfinite.append(name)
        if name in _GPT2_TOP_NAMES:
            state[_GPT2_TOP_NAMES[name]] = w
            continue
        _, i, leaf = name.split(".", 2)
        hf_name, transpose = _GPT2_BLOCK_NAMES[leaf]
        state[f"transformer.h.{i}.{hf_name}"] = w.t().contiguous() if transpose else w
    check_finite(g.path, nonfinite)
    return state


def gguf_to_hf(
    path: str | os.PathLike[str] | GGUFFile,
    skip: frozenset[str] | set[str] = frozenset(),
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(hf_config, state)``: an HF Llama config dict and float32 tensors in HF names.

    Every tensor is dequantized (``gguf.quants``), its shape put back in PyTorch order,
    and q/k projections un-permuted (``unpermute_rotary``). ``lm_head.weight`` is present
    only when the file has ``output.weight`` (else ``tie_word_embeddings`` is True).
    Unknown tensor names and undequantizable types raise ``CheckpointError``.
    The GGUF tensors named in ``skip`` (kept quantized by the caller) are not read: they
    come back as empty tensors on the meta device, with their shapes. ``dtype``: each
    tensor is rounded to it as it is read (a bf16 model then never holds a float32 copy).
    """
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    cfg = hf_config_from_gguf(g)
    if cfg["model_type"] == "gpt2":
        return cfg, _gpt2_to_hf(g, cfg)
    names = check_llama_tensors(g, cfg)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    state = {}
    nonfinite = []
    # Dequantizing is most of a load (seconds for SmolLM2): a bar, shown on a terminal.
    bar = tqdm(
        names.items(), desc=f"loading {g.path.name}", unit="tensor", disable=None, leave=False
    )
    for name, hf_name in bar:
        if name in skip:
            state[hf_name] = torch.empty(g.tensors[name].shape, device="meta")
            continue
        w = g.dequantize(name, dtype)
        if not is_finite(w):  # NaN or inf in the values, or in a quantized block's scale
            nonfinite.append(name)
        proj = hf_name.split(".")[-2]
        if proj in heads:  # q and k come permuted for llama.cpp's rotary layout
            w = unpermute_rotary(w, heads[proj])
        state[hf_name] = w
    check_finite(g.path, nonfinite)
    return cfg, state


def check_llama_tensors(g: GGUFFile, cfg: dict[str, Any]) -> dict[str, str]:
    """``{GGUF tensor name: HF name}`` of a ``llama`` file, once every check that needs no
    tensor data has passed: the metadata describes these tensors
    (``check_metadata_against_tensors``), every name is known, none is missing, every type
    can be dequantized. Runs before any model is built or tensor read."""
    check_metadata_against_tensors(g, cfg)  # before any loop or allocation the metadata sizes
    n_layers = cfg["num_hidden_layers"]
    names = {name: _hf_name(name, n_layers) for name in g.tensors}
    unknown = sorted(n for n, hf in names.items() if hf is None)
    if unknown:
        raise CheckpointError(
            f"{str(g.path)!r} has tensors a Llama model does not use: {', '.join(unknown[:8])}"
        )
    expected = {f"model.layers.{i}.{hf}" for i in range(n_layers) for hf in _BLOCK_NAMES.values()}
    expected |= {"model.embed_tokens.weight", "model.norm.weight"}
    missing = sorted(expected - set(names.values()))
    if missing:
        raise CheckpointError(
            f"{str(g.path)!r} lacks tensors of a {n_layers}-layer Llama (HF names): "
            f"{', '.join(missing[:8])}"
        )
    bad = [t for t in g.tensors.values() if t.type not in DEQUANTIZABLE]
    if bad:
        raise CheckpointError(_type_message(g.path, bad))
    return names


# ----------------------------------------------------------------------------- tokenizer


# Pre-tokenizer regexes, as in llama.cpp's llama-vocab.cpp (and transformers' GGUF loader).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt-2", "gpt2", "default")
_DIGITS_PRE = ("smollm", "starcoder")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
PRE_TOKENIZERS = _GPT2_PRE + _DIGITS_PRE + _LLAMA3_PRE
"""``tokenizer.ggml.pre`` values ``gguf_tokenizer`` reproduces."""


def _pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for llama.cpp's pre-tokenizer name ``pre``.

    gpt-2: GPT-2's regex; smollm/starcoder: each digit alone first (``\\p{N}``), then
    GPT-2's regex; llama-bpe: Llama 3's regex, and a word that is itself a token is not
    merged piece by piece (``ignore_merges``). "default" (what llama.cpp's converter
    writes for a vocabulary it does not recognise) gets GPT-2's regex, as transformers'
    GGUF loader does; llama.cpp itself splits such text a little differently.
    """
    pt = tokenizers.pre_tokenizers
    # ByteLevel with use_regex=True splits with GPT-2's regex before mapping bytes.
    gpt2 = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return gpt2, False
    if pre in _DIGITS_PRE:
        return pt.Sequence([pt.Digits(individual_digits=True), gpt2]), False
    if pre in _LLAMA3_PRE:
        split = pt.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    raise CheckpointError(
        f"tokenizer.ggml.pre {pre!r} is not supported; valid: {', '.join(PRE_TOKENIZERS)}"
    )


def gguf_tokenizer(source: str | os.PathLike[str] | GGUFFile) -> BPETokenizer:
    """The byte-level BPE tokenizer a GGUF file describes (``tokenizer.ggml.model`` gpt2).

    Vocabulary ids are the positions in ``tokenizer.ggml.tokens``; merges come from
    ``tokenizer.ggml.merges`` (``"Ġ t"`` -> ``("Ġ", "t")``). Tokens typed control (3) are
    special added tokens, so ``"<|im_start|>"`` written in text encodes to its one id;
    user-defined ones (4) are plain added tokens. ``eos_token`` is the token at
    ``tokenizer.ggml.eos_token_id``.
    """
    g = source if isinstance(source, GGUFFile) else read_gguf(source)
    where = str(g.path)
    model = _meta(g, "tokenizer.ggml.model", str)
    if model != "gpt2":
        raise CheckpointError(f"{where!r} has a {model!r} tokenizer; valid: gpt2 (byte-level BPE)")
    pre_tokenizer, ignore_merges = _pre_tokenizer(_meta(g, "tokenizer.ggml.pre", str, "default"))
    tokens = _meta(g, "tokenizer.ggml.tokens", list)
    types = _meta(g, "tokenizer.ggml.token_type", np.ndarray, np.ones(len(tokens), int)).tolist()
    merges = _meta(g, "tokenizer.ggml.merges", list)
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(
            f"{where!r}: tokenizer.ggml.tokens must be {len(types)} strings, one per token type"
        )
    # Tokens are spelled in GPT-2's byte alphabet; one that is not (a plain-text token
    # some converters write) is re-spelled from its UTF-8 bytes, as transformers does.
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind != 3 and not set(tok) <= alphabet:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        if tok in vocab:
            raise CheckpointError(f"{where!r}: token {tok!r} appears twice (ids {vocab[tok]}, {i})")
        vocab[tok] = i
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise CheckpointError(
                f"{where!r}: merge {i} ({merge!r}) is not two vocabulary tokens separated by a space"
            )
        pairs.append((parts[0], parts[1]))
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    )
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = tokenizers.decoders.ByteLevel()
    added = tokenizers.AddedToken
    tok.add_special_tokens(
        [added(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    tok.add_tokens(
        [added(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )
    eos_id = _meta(g, "tokenizer.ggml.eos_token_id", int, None)
    if eos_id is not None and not 0 <= eos_id < len(tokens):
        raise CheckpointError(f"{where!r}: eos_token_id {eos_id} is outside the vocabulary")
    return BPETokenizer(tok, eos_token=tokens[eos_id] if eos_id is not None else None)


# ----------------------------------------------------------------------------- 4-bit weights

# GGUF block tensor (after "blk.N.") -> lmlab linear module (after "blocks.N.").
_LINEARS = {
    "attn_q.weight": "attn.q_proj",
    "attn_k.weight": "attn.k_proj",
    "attn_v.weight": "attn.v_proj",
    "attn_output.weight": "attn.o_proj",
    "ffn_gate.weight": "mlp.gate_proj",
    "ffn_up.weight": "mlp.up_proj",
    "ffn_down.weight": "mlp.down_proj",
}
# The layers of a block that decoding computes in one kernel call (fused_projection in
# models/transformer.py), and those computed alone.
_KERNEL_GROUPS = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("attn.o_proj",),
    ("mlp.down_proj",),
)


def q4_blocks(raw: bytes, kind: gguf.GGMLQuantizationType, rows: int):
    """Q4_0 / Q4_1 blocks -> (q [rows, K] uint8 in 0..15, scale, zero [rows, K/32] float32)
    with W = (q - 8) * scale + zero (``lmlab.quant.int4``): Q4_0 is d (q - 8), so zero = 0;
    Q4_1 is d q + m = d (q - 8) + (m + 8 d)."""
    Q = gguf.GGMLQuantizationType
    head = 4 if kind == Q.Q4_1 else 2
    blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, head + 16)
    floats = blocks[:, :head].contiguous().view(torch.float16).float()  # (nb, 1 or 2)
    packed = blocks[:, head:]  # (nb, 16): low nibbles are weights 0-15, high ones 16-31
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).view(rows, -1)  # (rows, K)
    d = floats[:, 0].view(rows, -1)  # (rows, K/32)
    zero = floats[:, 1].view(rows, -1) + 8 * d if kind == Q.Q4_1 else torch.zeros_like(d)
    return q, d, zero


def _block_linears(model: nn.Module, g: GGUFFile):
    """``(gguf name, tensor, module name, rotary heads or None)`` of each block's linear
    layer stored in ``g``, for ``keep_4bit`` and ``keep_8bit``: the heads are those of
    the q and k projections, whose rows llama.cpp permuted (``unpermute_rotary``)."""
    heads = {"attn_q.weight": model.config.n_heads, "attn_k.weight": model.config.kv_heads}
    for name, t in g.tensors.items():
        block, _, leaf = name.partition(".")[2].partition(".")
        if name.startswith("blk.") and leaf in _LINEARS:
            yield name, t, f"blocks.{block}.{_LINEARS[leaf]}", heads.get(leaf)


def keep_4bit(model: nn.Module, g: GGUFFile) -> dict[str, str]:
    """Put ``Int4Linear`` layers that keep the file's Q4_0/Q4_1 weights (scales and zeros
    rounded to bf16) in place of ``model``'s linear layers stored so; returns
    ``{gguf tensor name: lmlab module name}`` of those replaced.

    Each tensor is read and converted on its own, so a model built on the meta device
    never holds a dense copy of these weights. The q and k projections get llama.cpp's
    rotary permutation undone, as in ``gguf_to_hf``. Non-finite scales or minimums are
    refused (``check_finite``), as ``gguf_to_hf`` refuses non-finite weights.
    """
    Q = gguf.GGMLQuantizationType
    done, nonfinite, since_trim = {}, [], 0
    for name, t, module, heads in _block_linears(model, g):
        if t.type not in (Q.Q4_0, Q.Q4_1):
            continue
        q, scale, zero = q4_blocks(g.raw(name), t.type, t.shape[0])
        if not (is_finite(scale) and is_finite(zero)):
            nonfinite.append(name)
            continue
        if heads is not None:
            q, scale, zero = (unpermute_rotary(x, heads) for x in (q, scale, zero))
        dense = model.get_submodule(module)
        set_submodule(model, module, Int4Linear(q, scale, zero, dense.bias))
        done[name] = module
        since_trim += q.numel() // 2  # the 4-bit bytes kept
        if since_trim >= 4 << 20:  # the temporaries' holes go back as the weights grow
            return_free_memory()
            since_trim = 0
    check_finite(g.path, nonfinite)
    return done


def keep_8bit(model: nn.Module, g: GGUFFile) -> dict[str, str]:
    """Put ``Q8_0Linear`` layers that keep the file's Q8_0 weights (its bytes exactly,
    outputs in the input's dtype) in place of ``model``'s linear layers stored so; returns
    ``{gguf tensor name: lmlab module name}`` of those replaced. Only where lmlab's Q8_0
    kernel runs on this CPU and the layer fits it (outputs a multiple of 16, no bias);
    any other layer is dequantized as before. Each tensor is read on its own, and the q
    and k projections get llama.cpp's rotary permutation undone on their rows of blocks,
    as ``keep_4bit`` does. Non-finite scales are refused, naming the tensors."""
    if native_q8_0_mm() is None:
        return {}
    done, nonfinite = {}, []
    for name, t, module, heads in _block_linears(model, g):
        N, K = t.shape
        bias = model.get_submodule(module).bias
        if t.type != gguf.GGMLQuantizationType.Q8_0 or N % 16 or bias is not None:
            continue
        rows = torch.frombuffer(g.raw(name), dtype=torch.uint8).view(N, -1)  # a row's blocks
        if heads is not None:
            rows = unpermute_rotary(rows, heads).contiguous()
        layer = Q8_0Linear.from_blocks(lambda a, b, rows=rows: bytearray(rows[a:b].numpy()), N, K)
        if not is_finite(layer.scale):
            nonfinite.append(name)
            continue
        layer.float_output = False
        set_submodule(model, module, layer)
        done[name] = module
    check_finite(g.path, nonfinite)
    return done


def keep_q8_0_output(model: nn.Module, g: GGUFFile, dtype: torch.dtype) -> dict[str, str]:
    """Put a ``Q8_0Linear`` holding the file's Q8_0 output matrix in place of
    ``model.lm_head``, and, when the file ties it to the token embeddings (no
    ``output.weight``), a ``Q8_0Embedding`` reading the same blocks in place of
    ``model.tok_emb`` (rows in ``dtype``): the matrix is held once, in the file's 8 bits.
    Returns ``{gguf tensor name: "lm_head"}`` if it replaced them; nothing where
    the output matrix is not Q8_0, its sizes do not fit the kernel (outputs a multiple of
    16), its scales are not finite, or lmlab's Q8_0 kernel does not run on this CPU."""
    name = "output.weight" if "output.weight" in g.tensors else "token_embd.weight"
    t = g.tensors.get(name)
    if t is None or t.type != gguf.GGMLQuantizationType.Q8_0 or native_q8_0_mm() is None:
        return {}
    N, K = t.shape
    if N % 16 or K % 32:
        return {}
    # built in place on 2 MiB pages: moving it there afterwards would hold it twice for a
    # moment, the largest tensor of the load (28 MB for SmolLM2)
    head = Q8_0Linear.from_blocks(
        lambda start, stop: g.raw(name, (start, stop)), N, K, empty=empty_on_huge_pages
    )
    return_free_memory()
    if not is_finite(head.scale):
        return {}  # gguf_to_hf refuses the tensor, naming it
    model.lm_head = head
    if name == "output.weight":
        return {name: "lm_head"}
    model.tok_emb = Q8_0Embedding(model.lm_head, dtype)
    return {name: "lm_head"}  # and tok_emb: load_gguf lists it


def pack_4bit(model: nn.Module) -> None:
    """Pack each block's ``Int4Linear`` layers into the int4 CPU kernel's layout as decoding
    calls them (``Int4Linear.fuse``: q, k and v together, gate and up together; where the
    kernel runs). The packed copy takes the weights over, so the model holds them once,
    and the first decoding step packs nothing. Packing leaves free holes in the C heap
    that glibc keeps: they go back after each block (``return_free_memory``)."""
    for block in model.blocks:
        for names in _KERNEL_GROUPS:
            modules = dict(block.named_modules())
            layers = [modules.get(n) for n in names]  # GPT-2 blocks have no gate_proj
            if all(type(m) is Int4Linear for m in layers) and Int4Linear.fuse(layers):
                return_free_memory()


def place_side_by_side(model: nn.Module) -> None:
    """Lay the blocks of each block's 8-bit layers (``keep_8bit``) side by side, group by
    group as decoding calls them (q, k and v; gate and up; o; down), all in one block on
    2 MiB pages where Linux offers them (``lmlab.devices.empty_on_huge_pages``): each
    layer's ``qweight`` and ``scale`` become views of its group's tensors, so that
    ``Q8_0Linear.fuse`` computes a group in one call without copying anything. The
    layers' own copies are freed, and their heap pages handed back, group by group."""
    groups = []
    for block in getattr(model, "blocks", ()):  # other models have no such layers
        modules = dict(block.named_modules())
        for names in _KERNEL_GROUPS:
            layers = [modules.get(n) for n in names]
            if all(type(m) is Q8_0Linear and not m.float_output for m in layers):
                groups.append(layers)
    specs = []
    for layers in groups:
        blocks, K = sum(m.out_features for m in layers) // 16, layers[0].in_features
        specs += [((blocks, K // 2, 32), torch.int8), ((blocks, K // 32, 16), torch.float16)]
    placed = empty_on_huge_pages(*specs)
    for layers, qweight, scale in zip(groups, placed[0::2], placed[1::2], strict=True):
        start = 0
        for m in layers:
            rows = slice(start, start + m.out_features // 16)
            qweight[rows].copy_(m.qweight)
            scale[rows].copy_(m.scale)
            m.qweight, m.scale = qweight[rows], scale[rows]  # the layer's copy is freed
            start = rows.stop
        return_free_memory()  # and its pages handed back, group by group


def streamed_weights(model: nn.Module) -> list[tuple[object, str]]:
    """``(holder, attribute)`` of the weights a 4- or 8-bit model's decoding step reads in
    bulk: the int4 kernels' packed copies (``Int4Matmul.packed``) and the Q8_0 layers'
    blocks, for ``lmlab.devices.use_huge_pages`` (which leaves those already built on
    2 MiB pages where they are: the output matrix, the placed 8-bit layers)."""
    holders: list[tuple[object, str]] = []
    kernels: set[int] = set()
    for m in model.modules():
        kernel = getattr(m, "_kernel", None) if type(m) is Int4Linear else None
        if kernel is not None and kernel.packed is not None and id(kernel) not in kernels:
            kernels.add(id(kernel))
            holders.append((kernel, "packed"))
        elif type(m) is Q8_0Linear:
            holders += [(m, "qweight"), (m, "scale")]
    return holders


# ----------------------------------------------------------------------------- all together


def load_gguf(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    keep_quantized: bool | None = None,
) -> tuple[nn.Module, BPETokenizer | None, dict[str, Any]]:
    """``(model, tokenizer, info)`` from a GGUF file: lmlab's transformer in eval mode.

    The tokenizer is None when the file has no ``tokenizer.ggml.model`` (a model saved
    alone, for work on token ids).

    The model holds the dequantized weights in float32 (or ``dtype``). With
    ``keep_quantized`` the linear layers stored as Q4_0/Q4_1 stay 4-bit (``Int4Linear``,
    computing in bf16: about 2x faster decoding than bf16 weights, a quarter of their
    memory), and those stored as Q8_0 stay 8-bit where lmlab's Q8_0 kernel runs
    (``Q8_0Linear``: the file's bytes, half the memory of bf16; ``keep_8bit``), read tensor
    by tensor so that no dense copy of them is ever made. The output
    matrix, when the file stores it as Q8_0 (SmolLM2's tied token embedding), then stays
    in the file's blocks too (``Q8_0Linear``, float32 logits; ``keep_q8_0_output``), and
    a tied embedding reads its rows from them (``Q8_0Embedding``): 30 MB read per token
    instead of 57 MB of bf16, the file's weights exactly. Without lmlab's Q8_0 kernel
    (a CPU without AVX-512 BF16) the embedding and the head stay one tied matrix in ``dtype``.
    The weights decoding streams end up in one block on 2 MiB pages where Linux offers
    them (``streamed_weights``, ``lmlab.devices.use_huge_pages``).
    None means: when ``dtype`` is bf16 and the int4 CPU kernel exists, since float32 asks
    for exact numbers. ``info["quantized"]`` lists the layers kept. ``info`` has
    ``format`` ("gguf"), ``path``, ``architecture``, ``name`` (general.name),
    ``chat_template`` (str or None), ``bos_token`` and ``eos_token`` (strings or None),
    ``add_bos_token`` (bool) and ``model`` (the lmlab spec dict).
    """
    g = read_gguf(path)
    cfg = hf_config_from_gguf(g)
    hf_state = None
    if cfg["model_type"] == "llama":
        check_llama_tensors(g, cfg)  # before the model is built (reliability item 30)
    else:  # GPT-2 files are checked as they are converted, before the model is built
        _, hf_state = gguf_to_hf(g, dtype=dtype or torch.float32)
        keep_quantized = False
    if keep_quantized is None:
        keep_quantized = dtype == torch.bfloat16 and int4_kernel_available()
    spec = spec_from_hf_config(cfg)
    # The tokenizer first: building it makes ~20 MB of temporaries, which then do not sit
    # on top of the weights at the load's peak.
    tokenizer = gguf_tokenizer(g) if "tokenizer.ggml.model" in g.metadata else None
    return_free_memory()
    with torch.device("meta"):
        model = build_model(spec)
    kept = {**keep_4bit(model, g), **keep_8bit(model, g)} if keep_quantized else {}
    if kept:  # a 4- or 8-bit model: its output layer too reads the file's bytes (Q8_0)
        kept.update(keep_q8_0_output(model, g, dtype or torch.float32))
    # Tensor by tensor: the 4-bit layers are in place, the rest is dequantized (straight
    # to ``dtype``) and handed to the model as it is, so no dense copy of the whole model
    # ever exists. Loading SmolLM2 in 4 bits and decoding with it peaks at about 374 MB
    # of resident memory, of which 234 MB are torch's and lmlab's imports (407 MB with a
    # bf16 output matrix, 634 MB when decoding packed a second copy of the 4-bit weights,
    # 855 MB through the dense model).
    if hf_state is None:
        _, hf_state = gguf_to_hf(g, skip=set(kept), dtype=dtype or torch.float32)
    state = convert_hf_state_dict(hf_state, spec)
    del hf_state  # the model takes these tensors themselves: the weights are held once
    assign_converted(model, {k: v for k, v in state.items() if not v.is_meta}, dtype)
    del state
    if kept:
        pack_4bit(model)  # after assign_converted: its state_dict() reads the saved form
        place_side_by_side(model)
        use_huge_pages(streamed_weights(model))
    quantized = list(kept.values())
    if isinstance(model.tok_emb, Q8_0Embedding):
        quantized.append("tok_emb")
    check_tokenizer_fits(tokenizer, model, str(g.path))
    tokens = g.metadata.get("tokenizer.ggml.tokens", [])

    def token(key: str) -> str | None:
        i = _meta(g, f"tokenizer.ggml.{key}", int, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    info = {
        "format": "gguf",
        "path": str(g.path),
        "architecture": g.metadata["general.architecture"],
        "name": _meta(g, "general.name", str, None),
        "chat_template": _meta(g, "tokenizer.chat_template", str, None),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        # Without the key, llama.cpp adds BOS for Llama 3 style vocabularies only.
        "add_bos_token": _meta(
            g,
            "tokenizer.ggml.add_bos_token",
            bool,
            _meta(g, "tokenizer.ggml.pre", str, "default") in _LLAMA3_PRE,
        ),
        "model": spec,
        "quantized": quantized,
    }
    return model.eval(), tokenizer, info
