"""Read a Hugging Face Llama directory -- a release of ours or any HF checkpoint to import.

The one reader of such directories, used by the leakage audit, the attack runner and CLI, and
``to_megatron``: ``config.json``, the release dtype, the tensor shapes (from the safetensors headers, no
tensor data read), the tensors themselves (``*.safetensors``, single or sharded; all at once, or one at a
time through ``TensorReader`` for the megatron attack engine) and the tokenizer (``ReleaseTokenizer``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path; ValueError unless it holds a config.json."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist or has no config.json")
    return model_dir


def read_config(model_dir: str | Path) -> dict:
    """The directory's config.json."""
    return json.loads((check_model_dir(model_dir) / "config.json").read_text())


def release_dtype(hf_cfg: Mapping) -> str:
    """The dtype the tensors are stored in: ``dtype`` (transformers 5.x), else ``torch_dtype`` (4.x; a
    release of ours writes both, equal), else float32."""
    return str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")


def read_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]] | None:
    """HF name -> shape of every tensor, from the safetensors headers; None without ``*.safetensors``."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def read_weights(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF name -> tensor as stored, config.json); ValueError without config.json or ``*.safetensors``."""
    from safetensors.torch import load_file

    hf_cfg = read_config(model_dir)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(model_dir)!r} has no *.safetensors weights (only safetensors are read)")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(load_file(str(path)))
    return weights, hf_cfg


class TensorReader:
    """One tensor at a time from a directory's ``*.safetensors`` (single or sharded), as stored: a loader
    that places each global tensor on its ranks reads only what it places. A context manager (the files
    stay open inside it)."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{str(model_dir)!r} has no *.safetensors weights (only safetensors are read)")
        self._stack = contextlib.ExitStack()
        self._where = {}
        for path in files:
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            self._where.update({name: handle for name in handle.keys()})

    def keys(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not in the release")
        return self._where[name].get_tensor(name)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class ReleaseTokenizer:
    """The release's tokenizer: ``tokenizer.model`` (sentencepiece) if present, else ``AutoTokenizer``."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        sp = model_dir / "tokenizer.model"
        if sp.is_file():
            from pmp_megatron.data.tokenizer import Tokenizer

            tok = Tokenizer(sp)
            self._encode, self.eod, self.sha256 = tok.encode, tok.eod, tok.sha256
            return
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as err:
            raise ValueError(f"model directory {model_dir} has no usable tokenizer: {err}") from err
        if hf.eos_token_id is None:
            raise ValueError(f"the tokenizer of {model_dir} has no eos token (needed as end-of-document)")
        self._encode = functools.partial(hf.encode, add_special_tokens=False)
        self.eod = hf.eos_token_id
        self.sha256 = hashlib.sha256(
            "\n".join(f"{p}\t{i}" for p, i in sorted(hf.get_vocab().items())).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._encode(text)
