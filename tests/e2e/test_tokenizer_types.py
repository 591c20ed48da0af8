"""A Hugging Face tokenizer.json tokenizer and a megatron tiktoken vocabulary, end to end through the CLIs:
pmp-preprocess -> pmp-pretrain (TP=2, 2 steps) -> pmp-release -> transformers' AutoTokenizer on the release.
The release's tokenizer encodes every training document to exactly the ids in the dataset (eos appended as
end-of-document), decodes them back to the text, and config.json names its bos / eos ids; training refuses
data made with another tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pmp_megatron.testing import DEBUG_MODEL, tiny_hf_tokenizer, tiny_tiktoken_vocab

pytestmark = pytest.mark.e2e
DOCS = {"max_docs": 40, "max_chars": 3000}
NUM_SPECIAL = 16  # tiktoken control ids (the debug model's vocabulary holds 500 ids)


def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc


def _pipeline(tmp_path, tokenizer, kind):
    from pmp_megatron.mcore import free_port

    prefix = tmp_path / "prose"
    proc = _run("-m", "pmp_megatron", "preprocess", "--input", "builtin:prose", "--output-prefix", prefix,
                "--max-docs", DOCS["max_docs"], "--max-chars", DOCS["max_chars"],
                "--tokenizer-model", tokenizer,
                "--tokenizer-type", kind, "--tiktoken-num-special-tokens", NUM_SPECIAL, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={tokenizer}", f"data.tokenizer_type={kind}",
            f"data.tiktoken_num_special_tokens={NUM_SPECIAL}", "data.split=90,10,0", "data.num_workers=0"]
    run = [f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain", "--config", DEBUG_MODEL,
           "parallel.tensor_model_parallel_size=2", "pmp.mode=dense", "train.train_steps=2",
           "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=0",
           "optim.lr_warmup_steps=1", f"checkpoint.dir={tmp_path / 'run'}", "checkpoint.save_interval=2"]
    proc = _run("-m", "torch.distributed.run", "--nproc_per_node=2", *run, *data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _run("-m", "pmp_megatron", "release", "--checkpoint", tmp_path / "run", "--out", tmp_path / "rel")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prefix, tmp_path / "rel", run, data


def _check_round_trip(prefix, release):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pmp_megatron.data.corpora import iter_documents

    tok = AutoTokenizer.from_pretrained(str(release))
    meta = json.loads(prefix.with_suffix(".meta.json").read_text())
    tokens = np.fromfile(prefix.with_suffix(".bin"), dtype=meta["dtype"]).tolist()
    expected = []
    for doc in iter_documents("prose", **DOCS):
        ids = tok.encode(doc, add_special_tokens=False)
        assert tok.decode(ids) == doc
        expected += ids + [tok.eos_token_id]
    assert tokens == expected
    config = json.loads((release / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert meta["eod"] == tok.eos_token_id
    model = LlamaForCausalLM.from_pretrained(str(release))
    assert model.config.vocab_size >= len(tok)


@pytest.mark.slow
def test_huggingface_tokenizer_end_to_end(tmp_path):
    hf_dir = tiny_hf_tokenizer(tmp_path / "tokenizer")
    prefix, release, run, data = _pipeline(tmp_path, hf_dir, "huggingface")
    _check_round_trip(prefix, release)
    assert sorted(p.name for p in release.iterdir() if p.name.startswith("tokenizer")) == [
        "tokenizer.json", "tokenizer_config.json"]
    source = tmp_path / "tokenizer" / "tokenizer.json"
    assert (release / "tokenizer.json").read_bytes() == source.read_bytes()
    # data made with another tokenizer: refused by name before training
    other = tiny_hf_tokenizer(tmp_path / "other", vocab_size=380)
    data = [a.replace(f"data.tokenizer_model={hf_dir}", f"data.tokenizer_model={other}") for a in data]
    proc = _run("-m", "torch.distributed.run", "--nproc_per_node=2", *run, *data,
                f"checkpoint.dir={tmp_path / 'run2'}", timeout=600)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr and "sha256" in proc.stderr


@pytest.mark.slow
def test_tiktoken_end_to_end(tmp_path):
    vocab = tiny_tiktoken_vocab(tmp_path / "vocab.json")
    prefix, release, _, _ = _pipeline(tmp_path, vocab, "tiktoken")
    _check_round_trip(prefix, release)
    config = json.loads((release / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
