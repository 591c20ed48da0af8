"""Write a Hugging Face Llama release directory from a stream of (HF name, tensor) pairs.

The writer is the last gate before weights leave the owner: it accepts exactly the parameters of
``hf_llama.hf_names(model_cfg)`` as floating tensors, each once, and refuses anything else (a mask, a
planted extra tensor, a bool/integer tensor, a duplicate, a missing parameter) with a ``ValueError``
naming the tensor. Tensors are cast to the release dtype and buffered one shard at a time
(``max_shard_bytes``), so peak memory is about one shard. The directory is assembled beside ``out_dir``
and renamed into place, so a reader never sees a half-written release.

The release directory holds PUBLIC files only (``PUBLIC_FILES``): ``model.safetensors`` (or
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), ``config.json``,
``generation_config.json``, the tokenizer files and the model card ``README.md`` (``model_card.py``).
The ``release_manifest.json`` -- every tensor with
shape, dtype, file and the sha256 of its bytes, the file hashes, and the ``source`` record (the owner's
checkpoint path, pmp mode, layout) -- goes to the OWNER's directory (``owner_dir``, default the sibling
``<out>.owner/``, mode 0700), never into the release. ``overwrite`` never replaces a directory that holds
a private key file, nor one that holds the owner directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from pmp_megatron.atomic import write_text_atomic
from pmp_megatron.config import ModelConfig
from pmp_megatron.pmp.maskfile import is_key_file
from pmp_megatron.release import model_card
from pmp_megatron.release import tokenizer as hf_tokenizer
from pmp_megatron.release.hf_llama import hf_config, hf_shapes, torch_dtype
from pmp_megatron.release.model_card import CARD_FILE, CardInfo

MANIFEST = "release_manifest.json"  # in the owner directory, never in the release
FORMAT = "pmp_megatron.release/2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")
PUBLIC_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "README.md",
                *TOKENIZER_FILES)


def is_public_file(name: str) -> bool:
    """Whether a file name may sit in a release directory: weights, index, configs, tokenizer."""
    return name in PUBLIC_FILES or (name.startswith("model") and name.endswith(".safetensors"))


def default_owner_dir(out_dir: str | Path) -> Path:
    """The owner's directory of a release when none is given: the sibling ``<out>.owner``."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(out_dir.name + ".owner")


def owner_dir_of(owner_dir: str | Path | None, out_dir: str | Path) -> Path:
    """The owner directory of release ``out_dir`` (default ``<out>.owner``), resolved; ValueError if it is,
    or is inside, the release directory (it would be published, or deleted by an overwrite)."""
    out_dir = Path(out_dir).resolve()
    owner = default_owner_dir(out_dir) if owner_dir is None else Path(owner_dir).resolve()
    if owner.is_relative_to(out_dir):
        raise ValueError(f"owner directory {str(owner)!r} is inside the release directory {str(out_dir)!r}: "
                         f"the owner's files must stay out of the release")
    if owner.exists() and not owner.is_dir():
        raise ValueError(f"owner directory {str(owner)!r} exists and is not a directory")
    return owner


def prepare_owner_dir(owner_dir: str | Path | None, out_dir: str | Path) -> Path:
    """``owner_dir_of``, created with mode 0700 if it does not exist."""
    owner = owner_dir_of(owner_dir, out_dir)
    if not owner.exists():
        owner.mkdir(mode=0o700, parents=True)
        owner.chmod(0o700)  # exactly 0700 whatever the umask
    return owner


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw little-endian bytes (exactly what safetensors stores)."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class _ShardWriter:
    """Buffers tensors up to ``max_bytes`` and flushes each full buffer to its own safetensors file."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.files: list[tuple[Path, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = t
        self.buffered += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f"shard-{len(self.files):05d}.tmp"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates 0600; a release is meant to be read by others
        self.files.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> dict[str, str]:
        """Rename the shards to their HF names; return tensor name -> file name."""
        self.flush()
        n = len(self.files)
        where = {}
        for k, (path, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            where.update(dict.fromkeys(names, final))
        return where


def private_files(directory: Path) -> list[Path]:
    """The private key files (``*.safetensors`` with a ``pmp-mask`` format) anywhere under ``directory``
    (symlinks are not followed)."""
    found = []
    for root, _, files in os.walk(directory):
        found += [Path(root) / f for f in files if f.endswith(".safetensors") and is_key_file(Path(root) / f)]
    return sorted(found)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"release output {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"release output {str(out_dir)!r} is not empty (pass overwrite=True to replace "
                             f"it)")
        keys = private_files(out_dir)
        if keys:
            raise ValueError(f"release output {str(out_dir)!r} holds a private key file {str(keys[0])!r}: "
                             f"refusing to replace it (choose another --out)")


def write_release(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, model_cfg: ModelConfig,
                  dtype: str, source: dict, tokenizer_model: str | hf_tokenizer.TokenizerSpec | None = None,
                  max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
                  owner_dir: str | Path | None = None, card: CardInfo | None = None) -> Path:
    """Consume (HF name, tensor) pairs and write the release directory ``out_dir``; return its path. The
    manifest (with ``source``) goes to ``owner_dir`` (default ``<out>.owner``, mode 0700); ``card``, if
    given, becomes the model card ``README.md``."""
    out_dir = Path(out_dir).resolve()
    cast = torch_dtype(dtype)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    _check_target(out_dir, overwrite)
    owner = owner_dir_of(owner_dir, out_dir)  # checked before any work, created once the release is written
    bos, eos = 1, 2
    spec = hf_tokenizer.as_spec(tokenizer_model)
    if spec is not None:
        bos, eos, size = hf_tokenizer.tokenizer_ids(spec)
        if size > model_cfg.vocab_size:
            raise ValueError(f"tokenizer {spec.model!r} has {size} ids, more than "
                             f"model.vocab_size={model_cfg.vocab_size}")
    expected = hf_shapes(model_cfg)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = _ShardWriter(tmp, max_shard_bytes)
        records: dict[str, dict] = {}
        for name, t in tensors:
            if name not in expected:
                raise ValueError(f"refusing to release tensor {name!r}: not a parameter of the HF Llama "
                                 f"model (masks and extra tensors are never written)")
            if name in records:
                raise ValueError(f"refusing to release tensor {name!r}: given twice")
            if not t.is_floating_point():
                raise ValueError(f"refusing to release tensor {name!r}: dtype {t.dtype} is not a floating "
                                 f"point weight (a mask?)")
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {expected[name]}")
            t = t.detach().to("cpu", cast).contiguous()
            records[name] = {"shape": list(t.shape), "dtype": dtype, "sha256": tensor_sha256(t)}
            shards.add(name, t)
        missing = [n for n in expected if n not in records]
        if missing:
            raise ValueError(f"release is missing HF tensors: {missing}")
        where = shards.finish()

        files = sorted(set(where.values()))
        if len(files) > 1:
            total = sum(math.prod(s) for s in expected.values()) * cast.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = hf_config(model_cfg, dtype, bos, eos)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": bos, "eos_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if spec is not None:
            hf_tokenizer.write_tokenizer_files(spec, tmp, model_max_length=model_cfg.seq_length)
        if card is not None:
            (tmp / CARD_FILE).write_text(model_card.render(card, model_cfg))

        for name, rec in records.items():
            rec["file"] = where[name]
        manifest = {
            "format": FORMAT,
            "dtype": dtype,
            "num_parameters": sum(math.prod(s) for s in expected.values()),
            "source": source,
            "tensors": {n: records[n] for n in expected},
            "files": {p.name: file_sha256(p) for p in sorted(tmp.iterdir())},
        }
        stray = [p.name for p in tmp.iterdir() if not is_public_file(p.name)]
        assert not stray, f"non-public files in a release: {stray}"
        _swap_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(prepare_owner_dir(owner, out_dir) / MANIFEST,
                      json.dumps(manifest, indent=2, default=str) + "\n", mode=0o600)
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an empty directory, or any directory with ``overwrite``."""
    _check_target(out_dir, overwrite)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)
