"""lmlab checkpoints: one directory per saved model, written atomically.

Layout of a training run (``out_dir``) and of one checkpoint::

    run_dir/
      config.json                 the run's resolved configuration
      metrics.jsonl               one JSON object per logged event
      loss.png                    the loss curves
      checkpoints/
        step-00000100/
          config.json             {"model": spec, "tokenizer": {...} | null, ...}
          model.safetensors       the weights (tied tensors stored once)
          tokenizer.json          when a tokenizer was given
          train_state.pt          optimizer, RNG, data position, guard, step counters
          COMPLETE                written last: the files above and their sizes

Loading a model never unpickles anything: weights come from safetensors, and
``train_state.pt`` (plain tensors, numbers, strings, lists and dicts) is read with
``torch.load(weights_only=True)``, which refuses any other object.

A save writes everything into a hidden temporary directory beside the target, fsyncs each
file, writes ``COMPLETE`` last and then renames the directory into place in one
``os.rename``. A crash at any point leaves either the previous checkpoints alone (the
temporary directory is ignored) or a complete new one. A directory without a valid
``COMPLETE`` (or whose files do not have the sizes it lists) is incomplete: it is skipped
with a warning when looking for the newest checkpoint, and refused when named directly.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmlab.data.tokenizers import find_tokenizer
from lmlab.errors import CheckpointError
from lmlab.fileio import ordinary_permissions
from lmlab.models import base_model, build_model, model_spec

CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_STATE_FILE = "train_state.pt"
COMPLETE_FILE = "COMPLETE"

# safetensors dtype names of floating-point tensors, for choosing the loaded model's dtype.
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in a run: ``run_dir/checkpoints/step-00000100``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


# ----------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class Structure:
    """Something a higher layer builds around a plain family model (LoRA layers, adapters, a
    soft prompt: ``lmlab.finetune.peft``), as config.json records it under one key."""

    describe: Callable[[nn.Module], Any]
    """model -> the JSON entry describing it, or a falsy value when the model has none."""
    rebuild: Callable[[nn.Module, Any, str], nn.Module]
    """(plain model, entry, where for errors) -> the model with the structure rebuilt."""
    finish: Callable[[nn.Module, Any], nn.Module] | None = None
    """(model with its weights loaded, entry) -> the model ``load_model`` returns (PEFT
    folds LoRA over a float base into its weights here); None keeps it as it is."""


# config.json key -> Structure. Filled once by the layer that owns the structure when it is
# imported (``lmlab.finetune`` registers "peft"; ``import lmlab`` imports it), so that this
# layer saves and rebuilds it without importing anything above itself.
_STRUCTURES: dict[str, Structure] = {}


def register_structure(
    key: str,
    describe: Callable[[nn.Module], Any],
    rebuild: Callable[[nn.Module, Any, str], nn.Module],
    finish: Callable[[nn.Module, Any], nn.Module] | None = None,
) -> None:
    """Let checkpoints record (``describe``) and rebuild (``rebuild``, then ``finish`` once
    the weights are in) a structure under ``key`` in config.json."""
    _STRUCTURES[key] = Structure(describe, rebuild, finish)


def rebuild_structures(model: nn.Module, config: dict[str, Any], where: str) -> nn.Module:
    """``model`` with every registered structure that ``config`` records rebuilt around it."""
    for key, structure in _STRUCTURES.items():
        if config.get(key):
            model = structure.rebuild(model, config[key], where)
    return model


def finish_structures(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """``model`` (weights loaded) after each recorded structure's ``finish`` step."""
    for key, structure in _STRUCTURES.items():
        if config.get(key) and structure.finish is not None:
            model = structure.finish(model, config[key])
    return model


# ----------------------------------------------------------------------------- base references

BASE_KEY = "base"
"""config.json's key for the base model a PEFT checkpoint adapts (``checkpoint.base``)."""
_BASE_ATTRIBUTE = "lmlab_base"  # where ``attach_base`` keeps the entry on the family model


def attach_base(model: nn.Module, entry: dict[str, Any] | None) -> nn.Module:
    """Record on ``model`` the base it was loaded from (``checkpoint.base.base_entry``), so
    that its checkpoints store only the parameters that require gradients plus this
    reference; None forgets it. Returns ``model``."""
    setattr(base_model(model), _BASE_ATTRIBUTE, entry)
    return model


def attached_base(model: nn.Module) -> dict[str, Any] | None:
    """The base entry ``attach_base`` recorded on ``model``, or None."""
    return getattr(base_model(model), _BASE_ATTRIBUTE, None)


def trained_names(model: nn.Module) -> set[str]:
    """State-dict names of ``model``'s tensors that require gradients (every name of a
    tied one): what a checkpoint with a base reference stores."""
    trained = {_view_key(p) for p in model.parameters() if p.requires_grad}
    return {
        name
        for name, tensor in model.state_dict(keep_vars=True).items()
        if tensor.numel() > 0 and _view_key(tensor) in trained
    }


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    tokenizer: Any | None = None,
    train_state: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return its path.

    ``model`` must be a registered lmlab family (its spec goes into config.json), possibly
    under PEFT (LoRA, adapters, a soft prompt or prefix: ``lmlab.finetune.peft``), which
    config.json then describes under ``"peft"`` so that ``load_model`` rebuilds it.
    ``tokenizer``, if given, is saved with its ``save(directory)`` method and summarised by
    ``to_config()`` when it has one. ``train_state`` must hold only tensors, numbers,
    strings, bools, None, lists, tuples and dicts (it is loaded with ``weights_only=True``).
    ``extra_config`` entries are added at the top level of config.json. An existing
    checkpoint at ``path`` is replaced.

    A model with a base reference (``attach_base``: fine-tuning under PEFT) stores only
    its tensors that require gradients, and the reference under ``"base"``;
    ``lmlab.load`` loads the base and puts them back in.

    ``weights``: the tensors to store in place of ``model.state_dict()``, for a model
    whose own are shards (FSDP: ``lmlab.train.distributed.full_weights``), already
    without tied aliases and, under a base reference, holding only what trains.
    ``extra_dirs``: ``{name: folder}`` moved into the checkpoint as ``name/`` before its
    completion marker, which lists their files too (a distributed run's DCP shards).
    """
    path = Path(path)
    config = {
        "model": model_spec(base_model(model)),
        "tokenizer": _tokenizer_config(tokenizer),
        **(extra_config or {}),
    }
    for key, structure in _STRUCTURES.items():
        if entry := structure.describe(model):
            config[key] = entry
    only = None
    if base := attached_base(model):
        config[BASE_KEY] = base
        only = trained_names(model) if weights is None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_json(tmp / CONFIG_FILE, config)
        _save_weights(tmp / WEIGHTS_FILE, model, only, weights)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
        for name, folder in (extra_dirs or {}).items():
            os.rename(folder, tmp / name)
        sizes = {}
        for file in sorted(f for f in tmp.rglob("*") if f.is_file()):
            _fsync(file)
            sizes[file.relative_to(tmp).as_posix()] = file.stat().st_size
        # The marker goes last: its presence (and the sizes it lists) is what "complete" means.
        _write_json(tmp / COMPLETE_FILE, {"files": sizes})
        _fsync(tmp / COMPLETE_FILE)
        _fsync(tmp)
        if path.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            # A crash between the two renames leaves it under a hidden name, never half-written.
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _tokenizer_config(tokenizer: Any | None) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    to_config = getattr(tokenizer, "to_config", None)
    return to_config() if callable(to_config) else {"kind": type(tokenizer).__name__}


def _save_weights(
    file: Path,
    model: nn.Module,
    only: set[str] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the state dict (the names in ``only``, when given) with safetensors, storing
    each tied tensor once.

    safetensors refuses tensors that share memory. Tied weights (GPT-2's token embedding
    and output projection are one Parameter under two names) are stored under their first
    name only; loading fills the other names from it. Any other overlap is copied.
    """
    state = model.state_dict() if weights is None else weights
    tensors: dict[str, torch.Tensor] = {}
    seen_views: set[tuple] = set()
    seen_storages: set[int] = set()
    for name, tensor in state.items():
        if only is not None and name not in only:
            continue
        if tensor.numel() > 0:
            view = _view_key(tensor)
            if view in seen_views:
                continue  # an alias of a tensor already stored
            seen_views.add(view)
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages:
                tensor = tensor.clone()
            seen_storages.add(storage)
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    ordinary_permissions(file)  # save_file makes it 0600


def _view_key(tensor: torch.Tensor) -> tuple:
    """Identifies the exact memory a tensor views: equal keys mean the same tensor."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- finding


def incomplete_reason(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory ``path`` is not complete, or None when it is.

    Complete means: ``COMPLETE`` is valid JSON listing files, each listed file exists (the
    binary ones with the listed size), and the weights file's header agrees with its size.
    """
    path = Path(path)
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        return f"no {COMPLETE_FILE} marker"
    try:
        sizes = json.loads(marker.read_text(encoding="utf-8"))["files"]
        sizes = {str(name): int(size) for name, size in sizes.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"unreadable {COMPLETE_FILE} marker"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in sizes:
            return f"{COMPLETE_FILE} does not list {name}"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        # JSON files may be edited by hand (and a torn one fails to parse); binaries may not.
        if not name.endswith(".json") and file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {COMPLETE_FILE} says {size}"
    try:
        read_safetensors_header(path / WEIGHTS_FILE)
    except CheckpointError as e:
        return str(e)
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest step first (incomplete ones are left out)."""
    return [path for path, _ in _step_dirs(run_dir) if incomplete_reason(path) is None]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none.

    Newer incomplete checkpoints (a crash mid-save, a truncated file) are skipped with a
    ``UserWarning`` naming the directory and what is wrong with it.
    """
    for path, _ in reversed(_step_dirs(run_dir)):
        reason = incomplete_reason(path)
        if reason is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {str(path)!r}: {reason}", stacklevel=2)
    return None


def _step_dirs(run_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """``(path, step)`` of every ``checkpoints/step-N`` directory, by increasing step."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("step-") and name[5:].isdigit():
            found.append((path, int(name[5:])))
    return sorted(found, key=lambda item: item[1])


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory from ``path``: a checkpoint itself, or a run
    directory (its newest complete checkpoint). Anything else is a ``CheckpointError``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint path {str(path)!r} is a file; give a checkpoint directory "
            f"(holding {WEIGHTS_FILE}) or a run directory (holding {CHECKPOINTS_DIR}/)"
        )
    if (path / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"run directory {str(path)!r} has no complete checkpoint in {CHECKPOINTS_DIR}/"
            )
        return latest
    if not (path / WEIGHTS_FILE).exists() and not (path / COMPLETE_FILE).exists():
        raise CheckpointError(
            f"{str(path)!r} is neither a checkpoint directory (no {WEIGHTS_FILE}) nor a run "
            f"directory (no {CHECKPOINTS_DIR}/)"
        )
    reason = incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {reason}")
    return path


# ----------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, base: nn.Module | None = None
) -> tuple[nn.Module, Any | None, dict[str, Any]]:
    """Rebuild the model saved at ``path`` -> ``(model, tokenizer or None, config dict)``.

    ``path`` is a checkpoint directory or a run directory (then its newest complete
    checkpoint is used). The model is built from config.json's ``"model"`` spec, filled
    from model.safetensors and put in eval mode. ``dtype`` casts it; by default it keeps
    the dtype the weights were saved in, so save then load is bit-exact.

    A checkpoint with a base reference (``"base"``) holds only trained tensors: ``base``
    must be that base model, loaded (``lmlab.load`` finds it, checks its hash and passes
    it here); it is used in place, and the saved tensors go into it.
    """
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    where = str(ckpt / CONFIG_FILE)
    if config.get(BASE_KEY):
        model = _checked_base(base, config, where)
    else:
        check_spec_against_weights(config["model"], ckpt / WEIGHTS_FILE)
        try:
            model = build_model(config["model"])
        except Exception as e:
            raise CheckpointError(f"{where!r}: cannot build the model from its spec: {e}") from e
    model = rebuild_structures(model, config, where)
    if dtype is None:
        dtype = _saved_float_dtype(ckpt / WEIGHTS_FILE)
    if dtype is not None:
        model.to(dtype)
    load_weights(model, ckpt)
    model = finish_structures(model, config)
    model.eval()
    tokenizer = find_tokenizer(ckpt)
    check_tokenizer_fits(tokenizer, model, str(ckpt))
    return model, tokenizer, config


def _checked_base(base: nn.Module | None, config: dict[str, Any], where: str) -> nn.Module:
    """The base model given for a checkpoint with a base reference, after checking that
    it is the model the checkpoint's spec describes."""
    source = config[BASE_KEY].get("source") if isinstance(config[BASE_KEY], dict) else None
    if base is None:
        raise CheckpointError(
            f"{where!r} holds only the tensors trained over its base {source!r}; load it with "
            "lmlab.load, which loads the base too"
        )
    spec = json.loads(json.dumps(model_spec(base_model(base))))  # tuples -> lists, as saved
    if spec != config["model"]:
        diff = sorted(
            k for k in set(spec) | set(config["model"]) if spec.get(k) != config["model"].get(k)
        )
        raise CheckpointError(
            f"{where!r}: its base {source!r} is not the model it was trained on (differs in "
            f"{', '.join(diff)})"
        )
    return base


def check_tokenizer_fits(tokenizer: Any | None, model: nn.Module, where: str) -> None:
    """Refuse, at load, a tokenizer that can emit ids the model has no embedding row for.

    A tokenizer with more ids than the model's ``vocab_size`` belongs to another model:
    its ids ``vocab_size`` and up would fail at the first forward pass that meets one
    (an index error deep in the embedding). The error names both numbers. Fewer ids than
    rows is accepted: embedding tables are often padded for speed (nanoGPT's GPT-2:
    50,304 rows for 50,257 tokens; Qwen2.5: 151,936 for 151,665), and such a model is
    used with its tokenizer every day.
    """
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = getattr(tokenizer, "vocab_size", None)
    if isinstance(rows, int) and isinstance(ids, int) and ids > rows:
        raise CheckpointError(
            f"{where!r}: the tokenizer has {ids} token ids but the model's vocab_size is "
            f"{rows}: ids {rows}..{ids - 1} have no embedding row, so this tokenizer does not "
            "belong to this model"
        )


def check_spec_against_weights(spec: dict[str, Any], file: Path) -> None:
    """Refuse a config.json whose model spec describes another model than ``file`` holds,
    before the model is built: each tensor of the spec's model that the file stores must
    have the stored shape. The spec's model is built on the meta device (shapes, no
    memory) after bounding its layer count by the number of stored tensors, so a spec
    promising ``d_model`` 196,608 or 50,000,000 layers over a small file fails at once.
    A spec that cannot be built is left to ``build_model``, which says why.
    """
    header = read_safetensors_header(file)
    layers = spec.get("n_layers")
    if isinstance(layers, int) and layers > len(header):
        raise CheckpointError(
            f"{str(file.parent / CONFIG_FILE)!r} describes a {layers}-layer model, but "
            f"{str(file)!r} holds only {len(header)} tensors: it does not describe these weights"
        )
    try:
        with torch.device("meta"):
            model = build_model(spec)
    except Exception:
        return  # load_model's own build names the problem with the spec
    variable = set(getattr(model, "variable_shape_buffers", ()))
    for name, tensor in model.state_dict().items():
        if name in header and name not in variable:
            stored = tuple(header[name]["shape"])
            if stored != tuple(tensor.shape):
                raise CheckpointError(
                    f"{str(file)!r}: tensor {name!r} has shape {stored}, but the model "
                    f"config.json describes expects {tuple(tensor.shape)}: it does not "
                    "describe these weights"
                )


def read_config(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    file = Path(ckpt) / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{str(file)!r} has no 'model' spec object")
    return config


def load_weights(model: nn.Module, ckpt: str | os.PathLike) -> None:
    """Copy the weights of checkpoint directory ``ckpt`` into ``model``, in place.

    Every tensor of the model must be in the file with the same shape, and the file may
    hold nothing else; otherwise a ``CheckpointError`` names the file and the tensor.
    Tensors holding NaN or inf are refused too, all named in one error (after the finite
    ones were copied: a caller that catches it must not use ``model``).
    Floating-point tensors are cast to the model's dtype. Parameters keep their identity
    (an optimizer built on them stays valid) and tied weights stay tied.

    A checkpoint with a base reference holds only trained tensors: the model's other
    tensors keep their values (the base's), and a model that records another base
    (``attach_base``: a resumed fine-tuning run) is refused, naming both hashes.
    """
    file = Path(ckpt) / WEIGHTS_FILE
    header = read_safetensors_header(file)
    partial = _check_same_base(model, ckpt)
    state = model.state_dict()
    # Tied names (stored once at save) map to the first name of their group.
    first_name: dict[tuple, str] = {}
    source: dict[str, list[str]] = {}
    for name, tensor in state.items():
        key = _view_key(tensor) if tensor.numel() > 0 else ("empty", name)
        first_name.setdefault(key, name)
        source.setdefault(first_name[key], []).append(name)
    # Buffers whose size depends on the data (an n-gram's count tables) take the stored shape.
    variable = set(getattr(model, "variable_shape_buffers", ()))
    used = set()
    nonfinite = []
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for names in source.values():
                stored = next((n for n in names if n in header), None)
                if stored is None and partial:
                    continue  # a base tensor: the model already holds it
                if stored is None:
                    raise CheckpointError(
                        f"{str(file)!r} has no tensor {names[0]!r}, which the model needs"
                    )
                used.add(stored)
                tensor = f.get_tensor(stored)
                if not is_finite(tensor):
                    nonfinite.append(stored)  # not copied; the load fails below
                elif names[0] in variable:
                    _replace_buffer(model, names[0], tensor, file)
                else:
                    _copy_into(state[names[0]], tensor, stored, file)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors on a corrupt file
        raise CheckpointError(f"cannot read weights from {str(file)!r}: {e}") from e
    check_finite(file, nonfinite)
    unexpected = sorted(set(header) - used)
    if unexpected:
        raise CheckpointError(
            f"{str(file)!r} has tensors the model does not have: {', '.join(unexpected[:5])}"
            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )


def _check_same_base(model: nn.Module, ckpt: str | os.PathLike) -> bool:
    """Whether checkpoint ``ckpt`` holds only trained tensors over a base; refuses one whose
    base differs from the base recorded on ``model``."""
    entry = read_config(ckpt).get(BASE_KEY)
    if not entry:
        return False
    mine = attached_base(model)
    if mine is not None and isinstance(entry, dict) and mine.get("sha256") != entry.get("sha256"):
        raise CheckpointError(
            f"{str(ckpt)!r} was trained over base {entry.get('source')!r} (weights sha256 "
            f"{entry.get('sha256')}), this model over {mine.get('source')!r} (sha256 "
            f"{mine.get('sha256')}); give the base the checkpoint was trained on"
        )
    return True


def is_finite(tensor: torch.Tensor) -> bool:
    """True unless a floating-point ``tensor`` holds a NaN or an infinity (one pass).

    Its minimum and maximum are finite exactly when every element is (a NaN propagates
    into both): no mask of the tensor's size is allocated, which matters while a loader
    holds a whole model.
    """
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: aminmax is not implemented for e4m3fn
        tensor = tensor.to(torch.float16)  # exact, NaN stays NaN
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(file: str | os.PathLike, nonfinite: list[str]) -> None:
    """Refuse weights with NaN or inf: a ``CheckpointError`` naming ``file`` and the tensors
    in ``nonfinite`` (names found by ``is_finite``), or nothing when the list is empty.

    Such weights load silently but every logit they touch is NaN: sampling then fails
    deep inside ``torch.multinomial`` and greedy decoding prints nothing.
    """
    if nonfinite:
        names = ", ".join(nonfinite[:5])
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        raise CheckpointError(
            f"{str(file)!r} holds non-finite weights (NaN or inf) in {len(nonfinite)} "
            f"tensor(s): {names}{more}; refusing to load a model whose outputs would be NaN"
        )


def _replace_buffer(model: nn.Module, name: str, tensor: torch.Tensor, file: Path) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._buffers[leaf]
    if tensor.dtype != old.dtype or tensor.dim() != old.dim():
        raise CheckpointError(
            f"{str(file)!r}: tensor {name!r} is {tensor.dtype} with {tensor.dim()} dims, but the "
            f"model expects {old.dtype} with {old.dim()}"
        )
    module._buffers[leaf] = tensor.to(old.device)


def _copy_into(target: torch.Tensor, tensor: torch.Tensor, name: str, file: Path) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{str(file)!r}: tensor {name!r} has shape {tuple(tensor.shape)}, but the model "
            f"built from config.json expects {tuple(target.shape)}"
        )
    if tensor.dtype.is_floating_point != target.dtype.is_floating_point:
        raise CheckpointError(
            f"{str(file)!r}: tensor {name!r} has dtype {tensor.dtype}, but the model expects "
            f"{target.dtype}"
        )
    with torch.no_grad():
        target.copy_(tensor)


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header, checked against the file's size.

    Format: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
    then the data; the last tensor must end exactly at the end of the file.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise CheckpointError(
                    f"{str(file)!r} is truncated or corrupt: header of {n} bytes in a "
                    f"file of {size} bytes"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(file)!r} has a corrupt header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(file)!r} has a corrupt header (not a JSON object)")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        begin, stop = _checked_entry(file, name, entry)
        spans.append((begin, stop, name))
    # The data must be covered exactly once: sorted spans, each starting where the last ended.
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise CheckpointError(
                f"{str(file)!r} is corrupt: tensor {name!r} at bytes [{begin}, {stop}) {what} "
                f"(which ends at {end})"
            )
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(
            f"{str(file)!r} is truncated or corrupt: its header describes "
            f"{8 + n + end} bytes, the file has {size}"
        )
    return header


_ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2}
_ITEM_SIZES |= {"F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _checked_entry(file: Path, name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) data offsets of one header entry, after checking its dtype and shape
    agree with them: ``end - begin == prod(shape) * itemsize``."""
    where = f"{str(file)!r}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} has a corrupt header entry (not an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _ITEM_SIZES:
        raise CheckpointError(
            f"{where} has unknown dtype {dtype!r}; valid: {', '.join(sorted(_ITEM_SIZES))}"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has a corrupt shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where} has corrupt data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _ITEM_SIZES[dtype]:
        raise CheckpointError(
            f"{where}: shape {shape} of {dtype} needs {numel * _ITEM_SIZES[dtype]} bytes, "
            f"its data_offsets {offsets} hold {offsets[1] - offsets[0]}"
        )
    return offsets[0], offsets[1]


def _saved_float_dtype(file: Path) -> torch.dtype | None:
    """The one floating dtype of the saved tensors, or None when they are mixed."""
    found = {entry.get("dtype") for entry in read_safetensors_header(file).values()}
    floats = {FLOAT_DTYPES[d] for d in found if d in FLOAT_DTYPES}
    return floats.pop() if len(floats) == 1 else None


def load_train_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The training state of checkpoint ``ckpt``, loaded without unpickling any object."""
    file = Path(ckpt) / TRAIN_STATE_FILE
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has no {TRAIN_STATE_FILE}: it holds a model only, so "
            "training cannot resume from it (use init_from to start from its weights)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {str(file)!r} (weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(file)!r} does not hold a dict")
    return state


# ----------------------------------------------------------------------------- rotation


def rotate_checkpoints(
    run_dir: str | os.PathLike,
    keep_last: int,
    keep_best: int | None = None,
    metric: str = "val_loss",
) -> list[Path]:
    """Delete complete checkpoints beyond the ``keep_last`` newest and the ``keep_best``
    best, and return the deleted paths.

    "Best" means the lowest ``config.json["train"][metric]`` (checkpoints without that
    number are never best). Incomplete directories are left alone for inspection.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last!r} is invalid: must be at least 1")
    checkpoints = list_checkpoints(run_dir)
    keep = set(checkpoints[-keep_last:])
    if keep_best:
        scored = []
        for path in checkpoints:
            value = read_config(path).get("train", {}).get(metric)
            if isinstance(value, (int, float)):
                scored.append((value, path))
        keep.update(path for _, path in sorted(scored, key=lambda s: s[0])[:keep_best])
    deleted = [path for path in checkpoints if path not in keep]
    for path in deleted:
        # Marker first, so a crash mid-delete leaves an incomplete (skipped) directory.
        (path / COMPLETE_FILE).unlink()
        trash = path.parent / f".{path.name}.del-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return deleted


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Clean up the hidden directories a crashed save, replace or delete left behind.

    A complete one whose checkpoint name is free again (a crash between the two renames
    of a replace) is renamed back into place, the newer (``.tmp-``) first; the rest are
    deleted. Returns the deleted paths. Call only when no other process is saving into
    this run (the trainer does at start).
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    hidden = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.startswith(".step-")),
        key=lambda p: ".tmp-" not in p.name,  # newer saves first
    )
    deleted = []
    for path in hidden:
        target = folder / path.name[1:].rsplit(".", 1)[0]  # ".step-N.tmp-abc" -> "step-N"
        if ".del-" not in path.name and not target.exists() and incomplete_reason(path) is None:
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
