"""A Hugging Face Llama directory as the start of training: pmp-import-hf -> pmp-pretrain with
checkpoint.init_from at TP=2 (2 steps, dense) -> pmp-release. The release of iteration 0 gives transformers'
logits of the imported model (within 1e-5); the trained release loads, has moved, and keeps the HF
directory's own tokenizer. Bad input (a non-Llama directory, init_from in PMP mode or with another
architecture, a missing init_from) fails in one line naming it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmp_megatron.testing import spawn, tiny_hf_tokenizer

pytestmark = pytest.mark.e2e
ATOL = 1e-5


def _cli(*args, torchrun=False, timeout=900):
    if torchrun:
        from pmp_megatron.mcore import free_port

        args = ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _hf_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tiny_hf_tokenizer(directory)
    return directory


def _logits(model_dir, ids):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_import_train_release(tmp_path):
    from transformers import AutoTokenizer

    hf = _hf_llama(tmp_path / "hf")
    proc = _cli("-m", "pmp_megatron", "import-hf", hf, "--out", tmp_path / "ckpt", "--tp", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (tmp_path / "ckpt" / "config.yaml").read_text()
    assert "tensor_model_parallel_size: 2" in saved and "tokenizer_type: huggingface" in saved

    prefix = tmp_path / "prose"
    proc = _cli("-m", "pmp_megatron", "preprocess", "--input", "builtin:prose", "--max-docs", "40",
                "--max-chars", "3000", "--output-prefix", prefix, "--tokenizer-model", hf,
                "--tokenizer-type", "huggingface", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    proc = _cli("-m", "pmp_megatron", "pretrain", "--config", tmp_path / "ckpt" / "config.yaml",
                f"checkpoint.init_from={tmp_path / 'ckpt'}", f"checkpoint.dir={run}",
                "checkpoint.save_init=true", "checkpoint.save_interval=2", f"data.data_path=[{prefix}]",
                "data.split=90,10,0", "data.num_workers=0", "train.train_steps=2", "train.micro_batch_size=2",
                "train.global_batch_size=4", "train.eval_interval=0", "optim.lr=1e-2",
                "optim.lr_warmup_steps=1",
                torchrun=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "initialised the weights from" in proc.stderr + proc.stdout

    for iteration in ("0", "2"):
        proc = _cli("-m", "pmp_megatron", "release", "--checkpoint", run, "--iteration", iteration,
                    "--out", tmp_path / f"rel{iteration}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    source = _logits(hf, ids)
    torch.testing.assert_close(_logits(tmp_path / "rel0", ids), source, atol=ATOL, rtol=0)
    trained = _logits(tmp_path / "rel2", ids)
    assert (trained - source).abs().max() > 1e-3  # two steps at lr 1e-2 moved the weights
    tok, ref = AutoTokenizer.from_pretrained(str(tmp_path / "rel2")), AutoTokenizer.from_pretrained(str(hf))
    text = "Imported weights, continued pretraining.\n  x = 1"
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)


def test_import_and_init_from_bad_input(tmp_path):
    from pmp_megatron.config import load_config
    from pmp_megatron.testing import DEBUG_MODEL

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = _cli("-m", "pmp_megatron", "import-hf", gpt2, "--out", tmp_path / "c")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "gpt2" in proc.stderr
    proc = _cli("-m", "pmp_megatron", "import-hf", tmp_path / "nowhere", "--out", tmp_path / "c")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "config.json" in proc.stderr
    with pytest.raises(ValueError, match="checkpoint.init_from.*pmp.mode=dense"):
        load_config(DEBUG_MODEL, ["pmp.mode=pmp", "pmp.rho=0.1", f"checkpoint.init_from={tmp_path}"])


def _init_worker(cfg_overrides):
    """In a spawned worker (the test process keeps no process group): weights of a debug model (dense,
    seed 5: not the source's) after init_weights, by parameter name; or the ValueError's message."""
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.testing import init_debug_parallel
    from pmp_megatron.train import resume

    cfg = init_debug_parallel(["pmp.mode=dense", "model.seed=5", *cfg_overrides], 1)
    chunks = build_model(cfg)
    try:
        if cfg.checkpoint.init_from is not None:
            resume.init_weights(cfg, chunks)
    except ValueError as e:
        return str(e)
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}


def _save_source_worker(directory):
    """In a spawned worker: save a dense seed-3 debug model at iteration 7; return its weights."""
    from pmp_megatron.config import config_to_dict
    from pmp_megatron.testing import init_debug_model
    from pmp_megatron.train import checkpoint

    cfg, chunks = init_debug_model(["pmp.mode=dense", "model.seed=3"], 1)
    checkpoint.save(directory, 7, chunks, None, cfg,
                    dict(config=config_to_dict(cfg), iteration=7, consumed_samples=0, pmp_mode="dense"))
    return {n: p.detach().clone() for n, p in chunks[0].named_parameters()}


def _init(cfg_overrides):
    result = spawn(_init_worker, 1, list(cfg_overrides))[0]
    if isinstance(result, str):
        raise ValueError(result)
    return result


def test_init_from_loads_exactly_and_names_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.init_from.*no valid checkpoint"):
        _init([f"checkpoint.init_from={tmp_path / 'none'}"])
    source = spawn(_save_source_worker, 1, str(tmp_path / "src"))[0]
    with pytest.raises(ValueError, match=r"another architecture: model.ffn_hidden_size"):
        _init([f"checkpoint.init_from={tmp_path / 'src'}", "model.ffn_hidden_size=160"])
    loaded = _init([f"checkpoint.init_from={tmp_path / 'src'}"])
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[n], source[n]) for n in source)
    fresh = _init([])  # without init_from: the seed-5 init, unlike the source (the load did the work)
    assert not any(torch.equal(fresh[n], source[n]) for n in source if "norm" not in n)
