"""The Megatron <-> HF Llama adapter and the release writer: bit-identical round trips (in memory and
through files), the per-group QKV layout, the writer's refusals (masks, extra, missing, duplicate and
non-float tensors), sharding, the manifest hashes (in the owner directory: the release holds public files
only), overwrite never replacing a key file, and the tokenizer files loading offline."""

import hashlib
import json
import stat
import struct

import pytest
import torch
from safetensors.torch import load_file

from pmp_megatron.config import load_config
from pmp_megatron.release import writer
from pmp_megatron.release.hf_llama import canonical_shapes, from_hf, hf_config, hf_names, hf_shapes, to_hf
from pmp_megatron.release.writer import MANIFEST, default_owner_dir, tensor_sha256, write_release
from pmp_megatron.testing import REPO, debug_config, tiny_sentencepiece

TINYLLAMA = REPO / "configs" / "model" / "tinyllama-1.1b.yaml"


def _tinyllama():
    return load_config(str(TINYLLAMA), ["model.num_layers=2", "pmp.mode=dense"]).model


CONFIGS = {
    "debug": lambda: debug_config().model,
    "debug_tied": lambda: debug_config(["model.untie_embeddings=false"]).model,
    "tinyllama_2l": _tinyllama,
}


def _random_canonical(m, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in canonical_shapes(m).items()}


def _all_to_hf(canonical, m) -> dict[str, torch.Tensor]:
    return {hf: t for name, w in canonical.items() for hf, t in to_hf(name, w, m)}


@pytest.mark.parametrize("which", list(CONFIGS))
def test_to_hf_from_hf_round_trip_is_bit_identical(which):
    m = CONFIGS[which]()
    canonical = _random_canonical(m)
    hf = _all_to_hf(canonical, m)
    assert list(hf) == hf_names(m)
    assert ("lm_head.weight" in hf) == m.untie_embeddings
    for name, t in hf.items():
        assert tuple(t.shape) == hf_shapes(m)[name]
    back = from_hf(hf, m)
    assert back.keys() == canonical.keys()
    for name, w in canonical.items():
        assert torch.equal(back[name], w), name


def test_qkv_split_follows_per_group_layout():
    m = debug_config().model  # 4 heads, 2 query groups, head_dim 16, hidden 64
    heads, groups, d, h = m.num_attention_heads, m.num_query_groups, m.head_dim, m.hidden_size
    per_group = heads // groups
    # Hand-built megatron layout: per group, the q rows of its heads, then k_g, then v_g.
    # Every row is filled with a code naming (kind, head, row) so we can see where it lands.
    rows = []
    for g in range(groups):
        for j in range(per_group):
            rows += [1000 + 100 * (g * per_group + j) + r for r in range(d)]
        rows += [2000 + 100 * g + r for r in range(d)]
        rows += [3000 + 100 * g + r for r in range(d)]
    qkv = torch.tensor(rows, dtype=torch.float32)[:, None].expand(-1, h).contiguous()
    out = dict(to_hf("decoder.layers.1.self_attention.linear_qkv.weight", qkv, m))
    q, k, v = (out[f"model.layers.1.self_attn.{p}_proj.weight"][:, 0] for p in "qkv")
    assert q.tolist() == [1000 + 100 * head + r for head in range(heads) for r in range(d)]
    assert k.tolist() == [2000 + 100 * g + r for g in range(groups) for r in range(d)]
    assert v.tolist() == [3000 + 100 * g + r for g in range(groups) for r in range(d)]
    # A known row: HF query head 3, row 5 is megatron row (group 1 * 4 rows-of-heads + head 1) * d + 5.
    assert q[3 * d + 5] == qkv[(1 * (per_group + 2) + 1) * d + 5, 0] == 1305
    # And fc1 = [gate; up].
    fc1 = torch.arange(2 * m.ffn_hidden_size, dtype=torch.float32)[:, None].expand(-1, h).contiguous()
    out = dict(to_hf("decoder.layers.0.mlp.linear_fc1.weight", fc1, m))
    assert out["model.layers.0.mlp.gate_proj.weight"][0, 0] == 0
    assert out["model.layers.0.mlp.up_proj.weight"][0, 0] == m.ffn_hidden_size


def test_mask_converts_with_the_weight_transform():
    m = debug_config().model
    gen = torch.Generator().manual_seed(1)
    for name, shape in canonical_shapes(m).items():
        w = torch.randn(shape, generator=gen)
        mask = torch.rand(shape, generator=gen) < 0.3
        hf_w = dict(to_hf(name, w, m))
        hf_mask = dict(to_hf(name, mask, m))
        hf_masked = dict(to_hf(name, torch.where(mask, w, 0.0), m))
        assert hf_mask.keys() == hf_w.keys()
        for key, mk in hf_mask.items():
            assert mk.dtype == torch.bool
            assert torch.equal(torch.where(mk, hf_w[key], 0.0), hf_masked[key]), key


def test_adapter_rejects_bad_input():
    m = debug_config().model
    tied = debug_config(["model.untie_embeddings=false"]).model
    with pytest.raises(ValueError, match="pmp_mask"):
        to_hf("pmp_mask", torch.zeros(3), m)
    with pytest.raises(ValueError, match="decoder.layers.4"):
        to_hf("decoder.layers.4.mlp.linear_fc2.weight", torch.zeros(64, 176), m)
    with pytest.raises(ValueError, match="unpadded"):
        to_hf("embedding.word_embeddings.weight", torch.zeros(512, 64), m)
    with pytest.raises(ValueError, match="output_layer"):
        to_hf("output_layer.weight", torch.zeros(500, 64), tied)
    hf = _all_to_hf(_random_canonical(m), m)
    with pytest.raises(ValueError, match="missing.*model.norm.weight"):
        from_hf({k: v for k, v in hf.items() if k != "model.norm.weight"}, m)
    with pytest.raises(ValueError, match="rotary_emb.inv_freq"):
        from_hf({**hf, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}, m)


def test_hf_config_loads_in_transformers():
    from transformers import LlamaConfig

    m = _tinyllama()
    cfg = LlamaConfig.from_dict(hf_config(m, "bfloat16"))
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 64 and cfg.vocab_size == 32000
    assert cfg.rope_parameters["rope_theta"] == 10000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings is False and cfg.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- writer


@pytest.fixture(scope="module")
def debug_release():
    m = debug_config().model
    canonical = _random_canonical(m, seed=3)
    return m, canonical, _all_to_hf(canonical, m)


def _safetensors_raw(path) -> dict[str, bytes]:
    """Tensor name -> raw bytes as stored in a safetensors file (parsed from its header)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        lo, hi = entry["data_offsets"]
        out[name] = data[8 + n + lo:8 + n + hi]
    return out


@pytest.mark.parametrize("planted", ["model.layers.0.self_attn.q_proj.mask", "pmp_mask"])
def test_writer_refuses_a_planted_tensor(tmp_path, debug_release, planted):
    m, _, hf = debug_release
    stream = [*hf.items(), (planted, torch.zeros(4))]
    with pytest.raises(ValueError, match=f"refusing to release tensor '{planted}'"):
        write_release(stream, tmp_path / "rel", m, "float32", source={})
    assert list(tmp_path.iterdir()) == []  # no output, no leftover temp dir


def test_writer_refuses_missing_duplicate_and_non_float(tmp_path, debug_release):
    m, _, hf = debug_release
    out = tmp_path / "rel"
    missing = [(k, v) for k, v in hf.items() if k != "model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing.*model.layers.2.mlp.up_proj.weight"):
        write_release(missing, out, m, "float32", source={})
    with pytest.raises(ValueError, match="'model.norm.weight': given twice"):
        write_release([*hf.items(), ("model.norm.weight", hf["model.norm.weight"])], out, m, "float32", {})
    for dtype in (torch.bool, torch.uint8):
        bad = {**hf, "model.layers.0.self_attn.q_proj.weight": hf["model.layers.0.self_attn.q_proj.weight"]
               .to(dtype)}
        with pytest.raises(ValueError, match="q_proj.weight.*not a floating"):
            write_release(bad.items(), out, m, "float32", source={})
    assert list(tmp_path.iterdir()) == []


def test_writer_shards_index_and_manifest(tmp_path, debug_release):
    m, _, hf = debug_release
    out = write_release(hf.items(), tmp_path / "rel", m, "float32", source={"iteration": 7},
                        max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(hf_names(m))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in hf.values())
    assert not (out / "model.safetensors").exists()
    assert all(writer.is_public_file(p.name) for p in out.iterdir()) and not (out / MANIFEST).exists()
    owner = default_owner_dir(out)
    assert owner == tmp_path / "rel.owner" and stat.S_IMODE(owner.stat().st_mode) == 0o700
    assert stat.S_IMODE((owner / MANIFEST).stat().st_mode) == 0o600
    manifest = json.loads((owner / MANIFEST).read_text())
    assert manifest["source"] == {"iteration": 7}
    assert list(manifest["tensors"]) == hf_names(m)
    raw = {}
    for f in files:
        for name, blob in _safetensors_raw(out / f).items():
            raw[name] = blob
            assert index["weight_map"][name] == f == manifest["tensors"][name]["file"]
    for name, rec in manifest["tensors"].items():
        assert rec["sha256"] == hashlib.sha256(raw[name]).hexdigest() == tensor_sha256(hf[name]), name
        assert rec["shape"] == list(hf[name].shape) and rec["dtype"] == "float32"
    for f, digest in manifest["files"].items():
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == digest
    assert not any("mask" in name for name in raw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_through_files(tmp_path, debug_release, dtype):
    m, canonical, hf = debug_release
    out = write_release(hf.items(), tmp_path / "rel", m, dtype, source={})
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    loaded = load_file(str(out / "model.safetensors"))
    back = from_hf(loaded, m)
    for name, w in canonical.items():
        assert torch.equal(back[name], w.to(getattr(torch, dtype))), name
    again = _all_to_hf(back, m)
    assert again.keys() == loaded.keys()
    for name, t in loaded.items():
        assert torch.equal(again[name], t), name
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    manifest = json.loads((default_owner_dir(out) / MANIFEST).read_text())
    for name, blob in _safetensors_raw(out / "model.safetensors").items():
        assert manifest["tensors"][name]["sha256"] == hashlib.sha256(blob).hexdigest(), name


def test_writer_never_overwrites_by_accident(tmp_path, debug_release):
    m, _, hf = debug_release
    out = tmp_path / "rel"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        write_release(hf.items(), out, m, "float32", source={})
    assert (out / "keep.txt").exists()
    write_release(hf.items(), out, m, "float32", source={}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel", "rel.owner"]


def test_overwrite_never_replaces_a_key_file_or_the_owner_dir(tmp_path, debug_release):
    """``pmp-release --out owner --overwrite`` used to delete whatever ``owner`` held, the private key
    included. A directory holding a key file (at any depth) is refused by name, nothing deleted."""
    from pmp_megatron.pmp import maskfile

    m, _, hf = debug_release
    out = tmp_path / "owner"
    key = out / "private" / "key.safetensors"
    maskfile.save({"model.norm.weight": torch.ones(4, dtype=torch.bool)}, key, rho=0.5, w0_seed=3)
    with pytest.raises(ValueError, match="holds a private key file .*key.safetensors"):
        write_release(hf.items(), out, m, "float32", source={}, overwrite=True)
    assert maskfile.load(key)[1]["w0_seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner"]  # no release, no owner dir, no temp
    with pytest.raises(ValueError, match="owner directory .* is inside the release directory"):
        write_release(hf.items(), tmp_path / "rel", m, "float32", source={}, owner_dir=tmp_path / "rel" / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner"]


def test_tokenizer_files_load_offline_and_encode_like_sentencepiece(tmp_path, debug_release, monkeypatch):
    import sentencepiece as spm
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m, _, hf = debug_release
    sp_model = tiny_sentencepiece(tmp_path)
    out = write_release(hf.items(), tmp_path / "rel", m, "float32", source={}, tokenizer_model=sp_model)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert len(tok) == sp.vocab_size() == m.vocab_size
    for text in ["Kalo mine ruvo.", "  Zen   quabre!  ", "Ünïcode ﬁ ① and 😀 bytes\nnew\tline", "", "a,42."]:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [sp.bos_id(), *ids], text
        assert tok.decode(ids) == sp.decode(ids), text
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    assert (config.bos_token_id, config.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (tok.bos_token_id,
                                                                                        tok.eos_token_id)
