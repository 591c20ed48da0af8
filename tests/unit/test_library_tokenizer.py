"""Hugging Face and tiktoken tokenizers through megatron.core.tokenizers (data.tokenizer_type): the ids equal
transformers' own encoding of the same files; megatron's tiktoken vocabulary converts to a tokenizer.json
that transformers loads and that encodes and decodes exactly as megatron's TikTokenTokenizer; the
tokenizer survives pickling (worker processes) and is named by a hash of its files; pmp-preprocess writes
the same dataset with 1 and 2 workers; bad input fails in one line naming the file or field."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pmp_megatron.data.library_tokenizer import LibraryTokenizer, load_tokenizer
from pmp_megatron.testing import tiny_hf_tokenizer, tiny_tiktoken_vocab

TEXTS = [
    "Hello world\n\n  x = 1  # café",
    "def f(x):\n\treturn x**2  # 12345 ünïcødé 日本語 <s> and </s> inside",
    "   leading and trailing   ",
    "The quick brown fox jumps over the lazy dog. 3.14159!",
    "",
    "emoji \U0001f600 and \u00a0nbsp\r\nCRLF",
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_hf_tokenizer(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    return tiny_tiktoken_vocab(tmp_path_factory.mktemp("tt") / "vocab.json")


def test_huggingface_ids_equal_transformers(hf_dir):
    from transformers import AutoTokenizer

    tok, ref = load_tokenizer("huggingface", hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.eod == ref.eos_token_id == tok.eos and tok.bos == ref.bos_token_id
    assert tok.vocab_size == len(ref)
    assert tok.encode_array(TEXTS[0]).dtype == np.int32
    # given as its tokenizer.json file: the same tokenizer, the same identity
    same = load_tokenizer("huggingface", f"{hf_dir}/tokenizer.json")
    assert same.sha256 == tok.sha256 and same.encode(TEXTS[1]) == tok.encode(TEXTS[1])


@pytest.mark.parametrize("pattern,num_special", [("v2", 1000), ("v1", 16)])
def test_tiktoken_converts_to_an_equal_tokenizer_json(tiktoken_file, tmp_path, pattern, num_special):
    from transformers import AutoTokenizer

    from pmp_megatron.release.tiktoken_hf import write_tiktoken_tokenizer

    tok = LibraryTokenizer("tiktoken", tiktoken_file, pattern, num_special)
    names = write_tiktoken_tokenizer(tiktoken_file, tmp_path, pattern, num_special, model_max_length=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == tok.vocab_size == len(json.loads(open(tiktoken_file).read())) + num_special
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos, tok.eod, tok.pad) == (1, 2, 4)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert all(i >= num_special for i in tok.encode(text.replace("<s>", "").replace("</s>", "")))
    assert tok.encode("<s>") == [1]  # control tokens in text are the control ids, as in megatron


def test_tokenizers_pickle_and_hash(hf_dir, tiktoken_file, tmp_path):
    for tok in (load_tokenizer("huggingface", hf_dir), load_tokenizer("tiktoken", tiktoken_file)):
        back = pickle.loads(pickle.dumps(tok))
        assert back.sha256 == tok.sha256 and back.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    a = load_tokenizer("tiktoken", tiktoken_file, tiktoken_num_special_tokens=16)
    b = load_tokenizer("tiktoken", tiktoken_file, tiktoken_num_special_tokens=17)
    assert a.sha256 != b.sha256  # other ids: another tokenizer for a dataset's identity check


def _preprocess(*args):
    return subprocess.run([sys.executable, "-m", "pmp_megatron", "preprocess", "--input", "builtin:prose",
                           "--max-docs", "12", "--max-chars", "2000", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_preprocess_with_a_huggingface_tokenizer(hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from pmp_megatron.data.corpora import iter_documents

    outs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        proc = _preprocess("--output-prefix", prefix, "--tokenizer-model", hf_dir, "--tokenizer-type",
                           "huggingface", "--workers", workers)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[workers] = (prefix.with_suffix(".bin").read_bytes(), prefix.with_suffix(".idx").read_bytes())
    assert outs[1] == outs[2]
    ref = AutoTokenizer.from_pretrained(hf_dir)
    expected = [i for doc in iter_documents("prose", max_docs=12, max_chars=2000)
                for i in ref.encode(doc, add_special_tokens=False) + [ref.eos_token_id]]
    meta = json.loads((tmp_path / "w1.meta.json").read_text())
    assert np.frombuffer(outs[1][0], dtype=meta["dtype"]).tolist() == expected
    assert meta["tokenizer_sha256"] == load_tokenizer("huggingface", hf_dir).sha256


def test_bad_tokenizer_input_is_one_line(hf_dir, tmp_path):
    from pmp_megatron.config import load_config
    from pmp_megatron.testing import DEBUG_MODEL

    with pytest.raises(ValueError, match="data.tokenizer_type"):
        load_config(DEBUG_MODEL, ["data.tokenizer_type=bpe"])
    with pytest.raises(ValueError, match="data.tiktoken_num_special_tokens"):
        load_config(DEBUG_MODEL, ["data.tiktoken_num_special_tokens=0"]).validate()
    with pytest.raises(ValueError, match="nothing-here.*tokenizer.json"):
        load_tokenizer("huggingface", tmp_path / "nothing-here")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer("tiktoken", bad)
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    config = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    (no_eos / "tokenizer.json").write_bytes((Path(hf_dir) / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="no eos"):
        load_tokenizer("huggingface", no_eos)
    proc = _preprocess("--output-prefix", tmp_path / "x", "--tokenizer-model", hf_dir, "--tokenizer-type",
                       "huggingface", "--train-tokenizer", "--vocab-size", "300")
    assert proc.returncode == 2 and "--tokenizer-type sentencepiece" in proc.stderr
    proc = _preprocess("--output-prefix", tmp_path / "y", "--tokenizer-model", bad,
                       "--tokenizer-type", "tiktoken")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "bad.json" in proc.stderr
    assert not (tmp_path / "y.bin").exists()
