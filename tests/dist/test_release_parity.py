"""A release written from any TP/PP/interleaved-PP layout loads in transformers as ``LlamaForCausalLM``
and gives our logits: the debug model at five layouts and the TinyLlama-1.1B architecture at 2 layers.
The release's tokenizer loads offline with ``AutoTokenizer`` and encodes like sentencepiece."""

import json

import pytest
import torch

from pmp_megatron.testing import REPO, spawn, tiny_sentencepiece

NUM_MICRO = 2
MICRO_BATCH = 2
ATOL = 1e-5

LAYOUTS = {
    "tp1": ([], 1),
    "tp2": (["parallel.tensor_model_parallel_size=2"], 2),
    "pp2": (["parallel.pipeline_model_parallel_size=2"], 2),
    "tp2_pp2": (["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], 4),
    "pp2_vpp2": (["parallel.pipeline_model_parallel_size=2",
                  "parallel.virtual_pipeline_model_parallel_size=2"], 2),
    # tied embeddings: the output layer is a copy on the last stage, the release has no lm_head
    "pp2_tied": (["parallel.pipeline_model_parallel_size=2", "model.untie_embeddings=false"], 2),
}
# the GPU config's sizes on CPU: fp32 on the local spec (it defaults to bf16 on Transformer Engine)
TINYLLAMA = (str(REPO / "configs" / "model" / "tinyllama-1.1b.yaml"),
             ["model.num_layers=2", "pmp.mode=dense", "model.seq_length=32", "model.params_dtype=float32",
              "model.transformer_impl=local"])


def _pipeline_logits(chunks, batches, cfg):
    """Forward-only pass through megatron's schedule; full-vocab logits [b, s, V] per microbatch on the
    last pipeline stage (gathered over TP, padded columns dropped), else None."""
    import torch.distributed as dist

    from pmp_megatron import mcore

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)  # no labels: logits [b, s, V_pad/TP]

        def keep_logits(output_tensor, non_loss_data=False):
            return output_tensor

        return output, keep_logits

    iters = [iter(batches) for _ in chunks]
    with torch.no_grad():
        local = mcore.get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not chunks[-1].post_process:  # not the last pipeline stage
        return None
    out = []
    for part in local:
        parts = [torch.empty_like(part) for _ in range(mcore.tp_size())]
        dist.all_gather(parts, part.contiguous(), group=mcore.tp_group())
        out.append(torch.cat(parts, dim=-1)[..., :cfg.model.vocab_size])
    return torch.cat(out)  # [num_micro * b, s, V]


def _release_and_logits(config_path, overrides, world_size, out_dir, tokenizer_model):
    """Build the model at a layout, compute its logits, and (rank 0) write the fp32 release."""
    import torch.distributed as dist

    from pmp_megatron import mcore
    from pmp_megatron.config import load_config
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import gather_full, shard_infos
    from pmp_megatron.release import to_hf, write_release
    from pmp_megatron.testing import synthetic_batches

    cfg = load_config(config_path, ["pmp.mode=dense", "model.seed=42", *overrides], world_size=world_size)
    p = cfg.parallel
    mcore.setup_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                         p.virtual_pipeline_model_parallel_size, rng_seed=cfg.train.seed)
    chunks = build_model(cfg)
    for chunk in chunks:
        chunk.eval()
    batches = synthetic_batches(cfg, NUM_MICRO, MICRO_BATCH)
    logits = _pipeline_logits(chunks, batches, cfg)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    if world_size > 1:
        full = gather_full({n: (prm, info) for n, (prm, info) in infos.items()})
    else:  # the same slices without pickling ~1 GB through all_gather_object (TinyLlama)
        full = {}
        for name, (prm, info) in sorted(infos.items()):
            full[name] = torch.empty(info.global_shape, dtype=prm.dtype)
            for lo, gl in info.local_slices():
                full[name][gl] = prm.detach()[lo]
    del chunks, infos
    if dist.get_rank() == 0:
        stream = (pair for name in list(full) for pair in to_hf(name, full.pop(name), cfg.model))
        source = {"layout": overrides, "world_size": world_size}
        write_release(stream, out_dir, cfg.model, "float32", source, tokenizer_model=tokenizer_model)
    dist.barrier()
    tokens = torch.cat([b["tokens"] for b in batches])
    return logits, tokens


def _run_and_compare(config_path, overrides, world_size, out_dir, tokenizer_model=None):
    """Max |logits diff| between our model and transformers on the release; and the same after swapping
    two query heads of layer 0 in the loaded HF model (a negative control: the check must see it)."""
    from transformers import AutoModelForCausalLM

    results = spawn(_release_and_logits, world_size, config_path, overrides, world_size, str(out_dir),
                    tokenizer_model)
    ours = [r[0] for r in results if r[0] is not None]
    tokens = results[0][1]
    assert all(torch.equal(o, ours[0]) for o in ours)  # every last-stage TP rank has the same logits
    ours = ours[0]
    assert ours.std() > 0.05  # not trivially flat
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        theirs = model(input_ids=tokens).logits
        q = model.model.layers[0].self_attn.q_proj.weight
        d = model.config.head_dim
        q[:2 * d] = torch.cat([q[d:2 * d], q[:d]])
        tampered = model(input_ids=tokens).logits
    assert theirs.shape == ours.shape
    diff = (theirs - ours).abs().max().item()
    print(f"release parity {overrides}: max |logits diff| = {diff:.3g}")
    assert (tampered - ours).abs().max().item() > 100 * ATOL
    return diff


@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_release_logits_match_ours(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides, world = LAYOUTS[layout]
    sp_model = tiny_sentencepiece(tmp_path) if layout == "tp1" else None
    out = tmp_path / "release"
    diff = _run_and_compare(str(REPO / "configs" / "model" / "debug.yaml"), overrides, world, out, sp_model)
    assert diff <= ATOL, f"{layout}: max |logits diff| {diff:.3g}"
    from pmp_megatron.release.writer import MANIFEST, default_owner_dir, is_public_file

    assert all(is_public_file(p.name) for p in out.iterdir()) and not (out / MANIFEST).exists()
    manifest = json.loads((default_owner_dir(out) / MANIFEST).read_text())  # the owner's, beside the release
    assert manifest["source"]["world_size"] == world
    assert not any("mask" in name for name in manifest["tensors"])
    if sp_model is not None:  # the tokenizer loads offline and encodes like sentencepiece
        import sentencepiece as spm
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
        sp = spm.SentencePieceProcessor(model_file=sp_model)
        for text in ["Kalo mine ruvo quabre.", "  Zen,  42!  ", "ünïcode ① 😀\nnew line"]:
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text


@pytest.mark.dist
def test_tinyllama_architecture_release_logits_match_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_path, overrides = TINYLLAMA
    diff = _run_and_compare(config_path, overrides, 1, tmp_path / "release")
    assert diff <= ATOL, f"tinyllama-1.1b (2 layers): max |logits diff| {diff:.3g}"
