"""The data pipeline: built-in corpora, tokenizer training, preprocessing to .bin/.idx, GPTDataset splits
and blends, the batch format and the resumable micro-batch sampler. Small inputs; one process (a
1-process gloo group where the process-group paths are exercised)."""

import hashlib
import json
import math
import os
import pickle
import socket
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pmp_megatron.cli import run
from pmp_megatron.data import corpora, datasets, indexed
from pmp_megatron.data.tokenizer import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMITS = dict(max_docs=40, max_chars=1500)
SEQ = 32


def _training_texts():
    return [*corpora.iter_documents("prose", **LIMITS), *corpora.iter_documents("code", **LIMITS)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(_training_texts(), tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=600)


@pytest.fixture(scope="module")
def prefixes(tok, tmp_path_factory):
    """Two small indexed datasets: prose and code."""
    out = tmp_path_factory.mktemp("indexed")
    for domain in ("prose", "code"):
        indexed.preprocess([f"builtin:{domain}"], out / domain, tok, progress=False, **LIMITS)
    return str(out / "prose"), str(out / "code")


@pytest.fixture
def process_group():
    """A 1-process gloo group, destroyed afterwards."""
    assert not dist.is_initialized()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- built-in corpora -------------------------------------------------------------------------------

_DIGEST_SCRIPT = """
import hashlib
from pmp_megatron.data import corpora
h = hashlib.sha256()
for d in corpora.list_domains():
    for doc in corpora.iter_documents(d, max_docs=25, max_chars=800):
        h.update(corpora.document_hash(doc))
print(h.hexdigest())
"""


def test_corpora_deterministic_across_processes():
    here = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": "1"}).stdout
    there = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "2"}).stdout
    assert here == there and len(here.strip()) == 64
    for domain in corpora.list_domains():
        first = list(corpora.iter_documents(domain, max_docs=25, max_chars=800))
        assert first == list(corpora.iter_documents(domain, max_docs=25, max_chars=800))
        assert len(first) == 25 and all(len(d) <= 800 for d in first)


@pytest.mark.parametrize("max_chars", [None, 200])
def test_corpora_domains_disjoint(max_chars):
    owner: dict[bytes, str] = {}
    for domain in corpora.list_domains():
        docs = list(corpora.iter_documents(domain, max_docs=150, max_chars=max_chars))
        assert docs, domain
        hashes = [corpora.document_hash(d) for d in docs]
        assert len(set(hashes)) == len(hashes), f"repeat inside {domain}"
        for h in hashes:
            assert h not in owner, f"a {domain} document is also in {owner[h]}"
            owner[h] = domain
    assert set(corpora.PRETRAINING_DOMAINS).isdisjoint(corpora.DOWNSTREAM_DOMAINS)
    assert set(corpora.list_domains()) == {*corpora.PRETRAINING_DOMAINS, *corpora.DOWNSTREAM_DOMAINS}


def test_corpora_write_jsonl_and_bad_inputs(tmp_path):
    path = tmp_path / "prose.jsonl"
    assert corpora.write_jsonl("prose", path, max_docs=5, max_chars=300) == 5
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert texts == list(corpora.iter_documents("prose", max_docs=5, max_chars=300))
    assert list(corpora.iter_source(path, max_docs=2)) == texts[:2]
    with pytest.raises(ValueError, match="unknown builtin domain 'nope'"):
        list(corpora.iter_documents("nope"))
    with pytest.raises(ValueError, match="unknown builtin domain"):
        indexed.check_inputs(["builtin:nope"])
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        indexed.check_inputs([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no 'text' key"):
        list(corpora.iter_source(bad))
    assert list(corpora.iter_source(bad, max_docs=1)) == ["fine"]  # stops before the bad line


def test_plain_text_documents(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nline two\n\n\nsecond one\n  \nthird\n")
    assert list(corpora.iter_source(path)) == [path.read_text()]
    assert list(corpora.iter_source(path, split_paragraphs=True)) == [
        "first paragraph\nline two", "second one", "third"]


# --- tokenizer --------------------------------------------------------------------------------------

def test_tokenizer_deterministic_and_round_trips(tok, tmp_path):
    again = train_tokenizer(_training_texts(), tmp_path / "again.model", vocab_size=600)
    assert _sha(tok.model_path) == _sha(again.model_path)
    assert tok.vocab_size == 600
    assert (tok.unk, tok.bos, tok.eod, tok.eos, tok.pad) == (0, 1, 2, 2, 3)
    samples = ["def f(x):\n\tif x:\n        return  x ** 2  # sq\n\n", "  Übergrößen 😀 naïve\r\n\x00end",
               *corpora.iter_documents("code_test", max_docs=3, max_chars=2000)]
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.pad not in ids and tok.eod not in ids and tok.unk not in ids
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(samples[0]) == tok.encode(samples[0]) and clone.sha256 == tok.sha256
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(["x"], tmp_path / "tiny.model", vocab_size=100)


# --- preprocessing ----------------------------------------------------------------------------------

def test_preprocess_byte_identical_across_runs_and_workers(tok, tmp_path):
    inputs = ["builtin:prose", "builtin:code_test"]
    limits = dict(max_docs=30, max_chars=1200)
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        meta = indexed.preprocess(inputs, tmp_path / name, tok, workers=workers, chunk_size=4,
                                  progress=False, **limits)
    for suffix in (".bin", ".idx"):
        digests = {_sha(tmp_path / f"{name}{suffix}") for name in "abc"}
        assert len(digests) == 1, suffix
    docs = list(indexed.iter_inputs(inputs, **limits))
    assert meta["num_documents"] == len(docs) == 60 and meta["dtype"] == "uint16"
    data = indexed.read_indexed(tmp_path / "a")
    assert len(data) == 60 and data.index.dtype == np.uint16
    assert meta["num_tokens"] == int(data.sequence_lengths.sum())
    for i in (0, 31, 59):
        assert data[i][-1] == tok.eod
        assert tok.decode(data[i][:-1]) == docs[i]
    assert indexed.read_meta(tmp_path / "a")["tokenizer_sha256"] == tok.sha256
    assert indexed.token_dtype(65536) is np.uint16 and indexed.token_dtype(65537) is np.int32


def test_preprocess_jsonl_key_and_failure_cleanup(tok, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in ["alpha beta", "gamma", "delta"]))
    indexed.preprocess([src], tmp_path / "ok", tok, json_key="body", progress=False)
    data = indexed.read_indexed(tmp_path / "ok")
    assert [tok.decode(data[i][:-1]) for i in range(3)] == ["alpha beta", "gamma", "delta"]
    with pytest.raises(ValueError, match=r"in.jsonl:1: no 'text' key"):
        indexed.preprocess([src], tmp_path / "bad", tok, workers=2, progress=False)
    assert not list(tmp_path.glob("bad*"))


def test_cli(tok, tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "pmp_megatron", "preprocess", "--help"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    assert "--output-prefix" in help_text and "--train-tokenizer" in help_text
    argv = ["--input", "builtin:prose", "--max-docs", "10", "--max-chars", "500", "--output-prefix",
            str(tmp_path / "cli"), "--tokenizer-model", str(tmp_path / "cli.model"), "--train-tokenizer",
            "--vocab-size", "400", "--workers", "1", "--no-progress"]
    assert run("preprocess", argv) == 0
    assert len(indexed.read_indexed(tmp_path / "cli")) == 10
    assert run("preprocess", ["--input", str(tmp_path / "nope.txt"), "--output-prefix", str(tmp_path / "x"),
                              "--tokenizer-model", tok.model_path]) == 2


# --- GPT datasets, blends, batches, sampler ---------------------------------------------------------

def test_gpt_dataset_samples(tok, prefixes, tmp_path):
    train, valid, test = datasets.build_datasets([prefixes[0]], "90,10,0", SEQ, (20, 2, 0), 1234, tok,
                                                 tmp_path / "cache")
    assert test is None and len(train) >= 20 and len(valid) >= 2
    for i in (0, 7, len(train) - 1):
        s = train[i]
        assert s["tokens"].shape == s["labels"].shape == (SEQ,)
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["position_ids"], torch.arange(SEQ))
        assert torch.equal(s["loss_mask"], torch.ones(SEQ))
    # unshuffled, the samples tile the stream of (shuffled) documents, EOD tokens included
    data = indexed.read_indexed(prefixes[0])
    stream = torch.from_numpy(np.concatenate([data[int(d)] for d in train.document_index]).astype(np.int64))
    unshuffle = np.argsort(train.shuffle_index)
    first = [train[int(unshuffle[j])] for j in range(40)]
    assert torch.equal(torch.cat([s["tokens"] for s in first]), stream[: 40 * SEQ])
    assert torch.equal(torch.cat([s["labels"] for s in first]), stream[1 : 40 * SEQ + 1])
    assert tok.eod in stream[: 40 * SEQ]
    batch = datasets.batch_from_samples([train[i] for i in range(3)])
    assert set(batch) == set(datasets.BATCH_KEYS)
    assert batch["tokens"].shape == (3, SEQ) and batch["tokens"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32 and batch["position_ids"].dtype == torch.long
    again, _, _ = datasets.build_datasets([prefixes[0]], "90,10,0", SEQ, (20, 2, 0), 1234, tok,
                                          tmp_path / "cache")  # from the cache: same order
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(5))
    with pytest.raises(ValueError, match="does not exist"):
        datasets.build_datasets([str(tmp_path / "none")], "1,0,0", SEQ, (1, 0, 0), 0, tok, None)


def test_blend_counts_follow_weights(tok, prefixes, tmp_path):
    num_samples = (40, 8, 4)
    data_path = ["0.75", prefixes[0], 0.25, prefixes[1]]  # strings as from a command line, or numbers
    splits = datasets.build_datasets(data_path, "80,10,10", SEQ, num_samples, 7, tok, tmp_path / "cache")
    for n, ds in zip(num_samples, splits, strict=True):
        # megatron asks ceil(n * w) samples of dataset i and blends exactly their sum
        expected = {0: math.ceil(n * 0.75), 1: math.ceil(n * 0.25)}
        assert len(ds) == sum(expected.values())
        assert Counter(int(ds[i]["dataset_id"]) for i in range(len(ds))) == expected
    assert (Counter(int(x) for x in splits[0].dataset_index)) == {0: 30, 1: 10}
    assert datasets.parse_data_path(data_path) == ([prefixes[0], prefixes[1]], [0.75, 0.25])
    assert datasets.parse_data_path(["a", "b"]) == (["a", "b"], None)
    with pytest.raises(ValueError, match="mixes weights and prefixes"):
        datasets.parse_data_path([1.0, "a", "b"])


def test_build_under_process_group(tok, prefixes, tmp_path, process_group):
    for node_local in (False, True):
        cache = tmp_path / f"cache{node_local}"
        train, _, _ = datasets.build_datasets([1, prefixes[0], 1, prefixes[1]], "1,0,0", SEQ, (12, 0, 0), 3,
                                              tok, cache, node_local_cache=node_local)
        assert len(train) == 12 and any(cache.iterdir())
    built, _, _ = datasets.build_datasets([prefixes[0]], "1,0,0", SEQ, (4, 0, 0), 3, tok, tmp_path / "c",
                                          is_built_on_rank=lambda: False)
    assert built is None


def test_sampler_resumes_exactly():
    total, micro, dp, num_micro = 103, 2, 3, 2
    global_batch = micro * dp * num_micro

    def run(rank, consumed, steps=None):
        it = iter(datasets.MicroBatchSampler(total, micro, rank, dp, consumed))
        out = []
        for batch in it:
            out.append(batch)
            if steps is not None and len(out) == steps * num_micro:
                break
        return out

    for rank in range(dp):
        whole = run(rank, 0)
        assert len(whole) == len(datasets.MicroBatchSampler(total, micro, rank, dp, 0)) == 103 // 6
        assert run(rank, 0, steps=3) + run(rank, 3 * global_batch) == whole
    ranks = [run(r, 0) for r in range(dp)]
    flat = sorted(i for r in ranks for b in r for i in b)
    assert flat == list(range(102))  # every sample once; the incomplete last block is dropped
    assert ranks[1][0] == [2, 3]
    with pytest.raises(ValueError, match="data_parallel_rank"):
        datasets.MicroBatchSampler(10, 1, 2, 2, 0)


def test_dataloader_batches(tok, prefixes, tmp_path):
    train, _, _ = datasets.build_datasets([prefixes[1]], "1,0,0", SEQ, (16, 0, 0), 5, tok, tmp_path / "c")
    loader = datasets.build_dataloader(train, micro_batch_size=2, data_parallel_rank=1, data_parallel_size=2,
                                       consumed_samples=4)
    first = next(iter(loader))
    assert first["tokens"].shape == (2, SEQ)
    assert torch.equal(first["tokens"], torch.stack([train[6]["tokens"], train[7]["tokens"]]))
