"""Hugging Face Llama directory -> megatron dist checkpoint ``DIR/iter_0000000`` (+ ``latest``), TP=1/PP=1.

The reverse of ``pmp-release``: the HF tensors are merged back to canonical megatron tensors
(``hf_llama.from_hf``: q/k/v -> interleaved ``linear_qkv``, gate/up -> ``linear_fc1``), copied into a model
built in this one process (padded vocabulary rows zero) and saved with ``train.checkpoint.save``. The
common state mirrors what ``Trainer._save`` writes for iteration 0: the run's ``config``, a fresh LR
``scheduler`` state, ``consumed_samples`` 0, ``pmp_mode``, ``has_masks`` False, ``iteration`` 0. Like the
trainer's own iteration-0 checkpoint (W0) it holds no optimizer state (a fresh Adam has none).

Being a dist checkpoint it loads at any layout with ``train.checkpoint.load`` (weights resharded), and
``pmp-release`` turns it back into the same HF tensors bit for bit. Limitations:

- ``pmp-pretrain`` resuming from it requests optimizer state the checkpoint does not have: like resuming
  from the trainer's own iteration-0 checkpoint, that needs ``checkpoint.load`` to skip the optimizer when
  the checkpoint holds none (owned by ``train/``, not done here);
- it carries no PMP masks: as a PMP run's starting point it would skip Stage I (the trainer resumes
  instead of discovering), so ``pmp_mode`` is ``dense`` unless the given config says otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch

from pmp_megatron import mcore
from pmp_megatron.config import Config, ModelConfig, ParallelConfig, PMPConfig, config_to_dict, save_config
from pmp_megatron.release.hf_llama import from_hf

logger = logging.getLogger(__name__)

# ModelConfig field <- HF config.json key: the architecture a Llama directory fixes.
_ARCH = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
         "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
         "ffn_hidden_size": "intermediate_size", "vocab_size": "vocab_size"}


def _rope_theta(hf_cfg: dict) -> float:
    rope = hf_cfg.get("rope_parameters") or {}
    scaling = hf_cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ValueError(f"HF config rope_type {kind!r} is not supported (only plain RoPE, 'default')")
    return float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_cfg: dict) -> ModelConfig:
    """The ModelConfig of an HF ``LlamaForCausalLM`` config.json; ValueError for what we cannot build."""
    if hf_cfg.get("model_type") != "llama":
        raise ValueError(f"HF config model_type is {hf_cfg.get('model_type')!r}, only 'llama' converts")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf_cfg.get(key, ok) != ok:
            raise ValueError(f"HF config {key}={hf_cfg[key]!r} is not supported (expected {ok!r})")
    heads = hf_cfg["num_attention_heads"]
    m = ModelConfig(**{f: hf_cfg[k] for f, k in _ARCH.items() if k in hf_cfg and hf_cfg[k] is not None},
                    seq_length=hf_cfg.get("max_position_embeddings", ModelConfig.seq_length),
                    rotary_base=_rope_theta(hf_cfg), norm_epsilon=float(hf_cfg.get("rms_norm_eps", 1e-5)),
                    init_method_std=float(hf_cfg.get("initializer_range", 0.02)),
                    untie_embeddings=not hf_cfg.get("tie_word_embeddings", False))
    if hf_cfg.get("num_key_value_heads") is None:
        m.num_query_groups = heads
    if hf_cfg.get("head_dim") not in (None, m.head_dim):
        raise ValueError(f"HF config head_dim {hf_cfg['head_dim']} != hidden_size / num_attention_heads "
                         f"= {m.head_dim} (not supported)")
    return m


def _check_model(given: ModelConfig, hf: ModelConfig) -> None:
    for f in (*_ARCH, "untie_embeddings"):
        if getattr(given, f) != getattr(hf, f):
            raise ValueError(f"config model.{f}={getattr(given, f)!r} disagrees with the HF directory "
                             f"({getattr(hf, f)!r})")


def read_hf_dir(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF name -> tensor, config.json) of a Llama directory (``*.safetensors``, single or sharded)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{str(hf_dir)!r} is not a Hugging Face model directory (no config.json)")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(hf_dir)!r} has no *.safetensors weights (only safetensors convert)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    return tensors, json.loads((hf_dir / "config.json").read_text())


def _prepare_target(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"checkpoint output {str(root)!r} exists and is not a directory")
    old = sorted(root.glob("iter_*")) + ([root / "latest"] if (root / "latest").exists() else [])
    if old and not overwrite:
        raise ValueError(f"checkpoint output {str(root)!r} already holds checkpoints (pass overwrite=True "
                         f"to replace them)")
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    root.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def to_megatron(hf_dir: str | Path, out_dir: str | Path, config: Config | None = None,
                overwrite: bool = False) -> Path:
    """Convert an HF Llama directory to ``out_dir/iter_0000000`` (TP=1, PP=1); return that folder.

    ``config`` is the run the checkpoint is meant for (its model section must match the HF architecture;
    its parallel layout is ignored: the checkpoint is written at TP=PP=1 and reshards on load). Default:
    the model of config.json, ``pmp.mode=dense``, the other sections at their defaults, and
    ``data.tokenizer_model`` = the directory's ``tokenizer.model`` when it has one.
    """
    import torch.distributed as dist

    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.train import checkpoint
    from pmp_megatron.train.optimizer import build_scheduler

    hf_dir, root = Path(hf_dir), Path(out_dir)
    tensors, hf_cfg = read_hf_dir(hf_dir)
    hf_model = model_config_from_hf(hf_cfg)
    if config is None:
        config = Config(model=hf_model, pmp=PMPConfig(mode="dense"))
        if (hf_dir / "tokenizer.model").is_file():
            config.data.tokenizer_model = str((hf_dir / "tokenizer.model").resolve())
    else:
        _check_model(config.model, hf_model)
    cfg = copy.deepcopy(config)
    cfg.parallel = ParallelConfig()  # TP=PP=1, no virtual stages: the layout this checkpoint is saved at
    cfg.validate()
    canonical = from_hf(tensors, cfg.model)  # validates names and shapes against the architecture
    del tensors

    mcore.init_distributed()
    if dist.get_world_size() != 1:
        raise ValueError(f"to_megatron runs in one process, got a world of {dist.get_world_size()}")
    _prepare_target(root, overwrite)
    mcore.init_model_parallel(1, 1, None, cfg.model.seed)
    chunks = build_model(cfg)
    for name, (param, info) in shard_infos(chunks, cfg.model.vocab_size).items():
        full = canonical.pop(name)
        param.copy_(info.to_local(full.to(param.dtype), param.shape).to(param.device))
    assert not canonical, f"HF tensors without a parameter: {sorted(canonical)}"

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # the schedule's state only
    common = dict(scheduler=build_scheduler(dummy, cfg).state_dict(), config=config_to_dict(cfg),
                  consumed_samples=0, pmp_mode=cfg.pmp.mode)
    folder = checkpoint.save(root, 0, chunks, None, cfg, common)
    save_config(cfg, root / "config.yaml")
    logger.info("converted %s to the megatron checkpoint %s (TP=1, PP=1)", hf_dir, folder)
    return folder
