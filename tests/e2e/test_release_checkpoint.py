"""`pmp-release` on real checkpoints made by `pmp-pretrain` (2 processes each): a PMP run with projection at
TP=2 and a dense run at PP=2 with virtual stages. The release, read in one process without the original
world, loads in transformers with our engine's logits of the same checkpoint; it holds exactly the HF
Llama tensors, no mask and public files only; the owner's manifest (in ``<out>.owner``) names the checkpoint
and iteration; the leakage audit runs on the PMP release with the exported key (its W0 seed) and writes to
the owner directory; HF -> megatron -> HF is bit-identical; bad inputs raise by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmp_megatron.release.writer import MANIFEST, default_owner_dir, is_public_file
from pmp_megatron.testing import DEBUG_MODEL, spawn

ATOL = 1e-5
LAYOUTS = {
    "tp2_pmp": ["parallel.tensor_model_parallel_size=2", "pmp.mode=pmp", "pmp.rho=0.5", "pmp.projection=true",
                "pmp.projection_interval=1", "pmp.projection_radius=2.0", "pmp.discovery.max_steps=2",
                "pmp.discovery.lr=1e-3"],
    "pp2_vpp2_dense": ["parallel.pipeline_model_parallel_size=2",
                       "parallel.virtual_pipeline_model_parallel_size=2", "pmp.mode=dense"],
    "tp1_dp2_frozen": ["pmp.mode=pmp", "pmp.rho=0.5", "pmp.complement=frozen", "pmp.discovery.max_steps=2"],
    "pp2_dense": ["parallel.pipeline_model_parallel_size=2", "pmp.mode=dense"],
    "tp2_pp2_dense": ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                      "pmp.mode=dense"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pmp_megatron.data.prepare import prepare_builtin

    model, prefixes = prepare_builtin(tmp_path_factory.mktemp("data"), 500, domains=("prose",),
                                      max_docs=80, max_chars=4000)
    return model, prefixes[0]


def _pretrain(data, run_dir, extra):
    from pmp_megatron.mcore import free_port

    model, prefix = data
    args = [f"data.data_path=[{prefix}]", f"data.tokenizer_model={model}", "data.split=90,10,0",
            "train.train_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.eval_interval=0", "optim.lr=2e-3", "optim.lr_warmup_steps=1",
            f"checkpoint.dir={run_dir}", "checkpoint.save_interval=2", "logging.log_interval=1", *extra]
    nproc = 4 if "parallel.pipeline_model_parallel_size=2" in extra and \
        "parallel.tensor_model_parallel_size=2" in extra else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "pmp_megatron", "pretrain", "--config",
           str(DEBUG_MODEL), *args]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _cli(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "pmp_megatron", "release", *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    runs = {}
    for name, extra in LAYOUTS.items():
        runs[name] = tmp_path_factory.mktemp(name)
        _pretrain(data, runs[name], extra)
    return runs


@pytest.fixture(scope="module")
def releases(checkpoints, tmp_path_factory):
    out = {}
    for name, run_dir in checkpoints.items():
        out[name] = tmp_path_factory.mktemp("releases") / name
        _cli("--checkpoint", run_dir, "--out", out[name])
    return out


def _our_logits(root, tokens, iteration=None):
    """Our engine on the checkpoint: loaded at TP=1/PP=1 in one process, GPTModel forward, no labels."""
    from pmp_megatron import mcore
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.release.key_export import single_process_config
    from pmp_megatron.train import checkpoint

    mcore.init_distributed()
    iteration = checkpoint.latest_valid(root) if iteration is None else iteration
    cfg = single_process_config(checkpoint.read_common(root, iteration))
    mcore.setup_parallel(rng_seed=cfg.train.seed)  # an RNG seed (a secret W0 seed is 128-bit)
    chunks = build_model(cfg)
    checkpoint.load(root, iteration, chunks, None, cfg)
    chunks[0].eval()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    with torch.no_grad():
        logits = chunks[0](tokens, positions, None)  # [b, s, V_pad]
    return logits[..., : cfg.model.vocab_size], iteration


def _model_cfg(run_dir):
    from pmp_megatron.config import load_config

    return load_config(Path(run_dir) / "config.yaml").model


def _safetensors(release_dir):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(release_dir).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_release_logits_match_our_engine(layout, checkpoints, releases, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pmp_megatron.release import hf_names

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir, out = checkpoints[layout], releases[layout]
    tokens = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    ours, iteration = spawn(_our_logits, 1, str(run_dir), tokens)[0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                 local_files_only=True)
    with torch.no_grad():
        theirs = model(input_ids=tokens).logits
    assert ours.std() > 0.05 and theirs.shape == ours.shape
    diff = (theirs - ours).abs().max().item()
    print(f"{layout}: max |logits diff| HF release vs our engine = {diff:.3g}")
    assert diff <= ATOL
    if (run_dir / "iter_0000000").is_dir():  # negative control: the release is not W0
        w0_logits, _ = spawn(_our_logits, 1, str(run_dir), tokens, 0)[0]
        assert (theirs - w0_logits).abs().max().item() > 1e-3

    names = set(_safetensors(out))
    assert names == set(hf_names(_model_cfg(run_dir)))  # nothing outside the HF Llama parameters
    assert not [p.name for p in out.rglob("*") if "mask" in p.name.lower()]
    assert all(is_public_file(p.name) for p in out.iterdir()), sorted(p.name for p in out.iterdir())
    manifest = json.loads((default_owner_dir(out) / MANIFEST).read_text())
    assert manifest["source"]["checkpoint"] == str(Path(run_dir).resolve())
    assert manifest["source"]["iteration"] == iteration == 2
    assert set(manifest["tensors"]) == names


@pytest.mark.e2e
def test_audit_of_the_pmp_release(checkpoints, tmp_path):
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release.from_checkpoint import AUDIT_FILE

    run_dir = checkpoints["tp2_pmp"]
    mask = tmp_path / "private" / "mask.safetensors"
    subprocess.run([sys.executable, "-m", "pmp_megatron", "export-mask", "--checkpoint", str(run_dir),
                    "--out", str(mask)], check=True, capture_output=True)
    seed = maskfile.load(mask)[1]["w0_seed"]
    assert seed is not None  # the key holds the run's W0 seed
    out = tmp_path / "release"
    proc = _cli("--checkpoint", run_dir, "--out", out, "--mask", mask)
    print(proc.stdout)
    assert "| recovery_global |" in proc.stdout and "| recovery_init |" in proc.stdout
    assert not (out / AUDIT_FILE).exists() and all(is_public_file(p.name) for p in out.iterdir())
    report = json.loads((default_owner_dir(out) / AUDIT_FILE).read_text())
    for attacker in ("recovery_global", "recovery_per_tensor", "recovery_init", "recovery_seed_guess"):
        iou = report["attackers"][attacker]["iou"]
        assert 0.0 <= iou["overall"] <= 1.0 and {"embed", "q", "down", "norms", "lm_head"} <= set(iou)
    # The seed is in the key: W0 regenerates and every masked-in entry left it.
    assert report["attackers"]["recovery_init"]["iou"]["overall"] > 0.99
    assert report["warning"] and "WARNING: MASK LEAK" in proc.stdout
    text = json.dumps(report)
    assert "sha256" not in text and str(mask) not in text
    if seed >= 1 << 64:  # a secret seed (drawn by the trainer): never written, and guessing finds nothing
        assert str(seed) not in text + proc.stdout + proc.stderr
        assert not report["attackers"]["recovery_seed_guess"]["seed_found"]
    assert not [p.name for p in out.rglob("*") if "mask" in p.name.lower()]

    # Auditing the existing release gives the same numbers, with the seed from the key.
    again = _cli("--audit", "--model", out, "--mask", mask)
    assert "| recovery_init | 1.0000 |" in again.stdout or "| recovery_init | 0.99" in again.stdout
    no_init = _cli("--checkpoint", run_dir, "--out", tmp_path / "r2", "--mask", mask, "--no-init-attack")
    assert "| recovery_init |" not in no_init.stdout


def _to_megatron(hf_dir, out_dir):
    from pmp_megatron.release.to_megatron import to_megatron

    return str(to_megatron(hf_dir, out_dir))


@pytest.mark.e2e
def test_hf_to_megatron_to_hf_is_bit_identical(releases, tmp_path):
    from pmp_megatron.train import checkpoint

    hf_dir = releases["tp2_pmp"]
    folder = spawn(_to_megatron, 1, str(hf_dir), str(tmp_path / "megatron"))[0]
    assert Path(folder) == tmp_path / "megatron" / "iter_0000000"
    assert (tmp_path / "megatron" / "latest").read_text().strip() == "0"
    common = spawn(checkpoint.read_common, 1, str(tmp_path / "megatron"), 0)[0]
    assert common["iteration"] == 0 and common["consumed_samples"] == 0 and not common["has_masks"]
    assert common["pmp_mode"] == "dense" and "scheduler" in common and "config" in common
    out = tmp_path / "again"
    _cli("--checkpoint", tmp_path / "megatron", "--out", out)
    a, b = _safetensors(hf_dir), _safetensors(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    tensors = lambda d: json.loads((default_owner_dir(d) / MANIFEST).read_text())["tensors"]  # noqa: E731
    assert tensors(hf_dir) == tensors(out)  # sha256 of every tensor's bytes, shapes, files
    assert (out / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()


@pytest.mark.e2e
def test_bad_inputs_are_named(checkpoints, releases, tmp_path):
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release import audit
    from pmp_megatron.train.checkpoint import resolve_iteration

    with pytest.raises(ValueError, match="does not exist"):
        resolve_iteration(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no valid iteration"):
        resolve_iteration(tmp_path / "empty")
    with pytest.raises(ValueError, match="iter_0000005"):
        resolve_iteration(checkpoints["tp2_pmp"], 5)
    weights = _safetensors(releases["tp2_pmp"])
    wrong = {n.replace("layers.0.", "layers.9."): torch.ones(w.shape, dtype=torch.bool)
             for n, w in weights.items()}
    maskfile.save(wrong, tmp_path / "wrong.safetensors", rho=0.5)
    with pytest.raises(ValueError, match="does not match the release names"):
        audit.audit_release(releases["tp2_pmp"], tmp_path / "wrong.safetensors")
    proc = _cli("--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x", ok=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
