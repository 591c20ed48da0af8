"""Dataset building on 2 gloo ranks: with a shared cache (rank 0 builds, the other waits and loads) and
with a per-node cache, every rank gets the same samples as a single process, and the sampler gives the
data-parallel ranks disjoint micro-batches."""

import json

import pytest
import torch

from pmp_megatron.data import corpora, datasets, indexed
from pmp_megatron.data.tokenizer import train_tokenizer
from pmp_megatron.testing import spawn

pytestmark = pytest.mark.dist
SEQ = 32


def _build(data_path, model_path, cache_dir, node_local):
    import torch.distributed as dist

    from pmp_megatron.data.tokenizer import Tokenizer

    dist.init_process_group("gloo")
    tok = Tokenizer(model_path)
    train, valid, _ = datasets.build_datasets(data_path, "90,10,0", SEQ, (24, 4, 0), 11, tok, cache_dir,
                                              node_local_cache=node_local)
    loader = datasets.build_dataloader(train, 2, dist.get_rank(), dist.get_world_size())
    return {
        "train": torch.stack([train[i]["tokens"] for i in range(len(train))]),
        "valid": torch.stack([valid[i]["tokens"] for i in range(len(valid))]),
        "first_batch": next(iter(loader))["tokens"],
    }


@pytest.mark.parametrize("node_local", [False, True])
def test_ranks_build_the_same_datasets(tmp_path, node_local):
    docs = [*corpora.iter_documents("prose", 30, 1500), *corpora.iter_documents("code", 30, 1500)]
    tok = train_tokenizer(docs, tmp_path / "tok.model", vocab_size=500)
    for name, part in (("a", docs[:30]), ("b", docs[30:])):
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        indexed.preprocess([jsonl], tmp_path / name, tok, progress=False)
    data_path = [0.5, str(tmp_path / "a"), 0.5, str(tmp_path / "b")]
    ref = spawn(_build, 1, data_path, tok.model_path, str(tmp_path / "ref_cache"), False)[0]
    ranks = spawn(_build, 2, data_path, tok.model_path, str(tmp_path / f"cache{node_local}"), node_local)
    for out in ranks:
        assert torch.equal(out["train"], ref["train"]) and torch.equal(out["valid"], ref["valid"])
    assert torch.equal(ranks[0]["first_batch"], ref["train"][0:2])
    assert torch.equal(ranks[1]["first_batch"], ref["train"][2:4])
