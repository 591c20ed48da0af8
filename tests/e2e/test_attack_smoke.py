"""The attack suite end to end on two tiny HF Llama releases (a synthetic "PMP" one whose complement is
0.9 * W0, and a dense one), through ``pmp-attack``: one JSON line per cell with finite numbers, the
authorized attacker changes only masked-in entries (bit for bit), init regeneration recovers the mask
exactly, a rerun skips every finished cell, and ``pmp-attack report`` writes the report and plots."""

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from pmp_megatron.attack import runner
from pmp_megatron.cli import run
from pmp_megatron.config import ModelConfig
from pmp_megatron.data.corpora import iter_documents
from pmp_megatron.data.tokenizer import train_tokenizer
from pmp_megatron.pmp import maskfile
from pmp_megatron.release.recovery import iter_w0
from pmp_megatron.release.writer import write_release
from pmp_megatron.testing import REPO

pytestmark = pytest.mark.e2e

SMOKE = REPO / "configs" / "attacks" / "smoke.yaml"
SEED, RHO, DECAY = 42, 0.5, 0.9


def _model_cfg() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=64, vocab_size=400, seq_length=64, seed=SEED, untie_embeddings=True)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attack")
    tok = tmp / "tok.model"
    train_tokenizer(iter_documents("prose", max_docs=40, max_chars=3000), tok, vocab_size=400)
    cfg = _model_cfg()
    gen = torch.Generator().manual_seed(0)
    w0 = dict(iter_w0(cfg))
    masks = {n: torch.rand(t.shape, generator=gen) < RHO for n, t in w0.items()}
    trained = {n: t + 0.02 * torch.randn(t.shape, generator=gen) for n, t in w0.items()}
    pmp = {n: torch.where(masks[n], trained[n], DECAY * w0[n]) for n in w0}
    dense = {n: t + 0.02 * torch.randn(t.shape, generator=gen) for n, t in w0.items()}
    dirs = {}
    for role, weights in (("pmp", pmp), ("dense", dense)):
        dirs[role] = write_release(weights.items(), tmp / role, cfg, "float32", {"test": role}, str(tok))
    mask_path = tmp / "mask.safetensors"
    maskfile.save(masks, mask_path, rho=RHO, w0_seed=SEED)  # the key holds the W0 seed
    model_yaml = tmp / "model.yaml"
    model_yaml.write_text("model:\n" + "".join(
        f"  {k}: {getattr(cfg, k)}\n" for k in ("num_layers", "hidden_size", "num_attention_heads",
                                               "num_query_groups", "ffn_hidden_size", "vocab_size",
                                               "seq_length")) + "  untie_embeddings: true\n")
    return {"tmp": tmp, "masks": masks, "model_yaml": model_yaml, "mask": mask_path, **dirs}


def _args(r, out):
    return ["--suite", str(SMOKE), "--model", str(r["pmp"]), "--dense-model", str(r["dense"]),
            "--mask", str(r["mask"]), "--seed-for-regeneration", str(SEED), "--model-config",
            str(r["model_yaml"]), "--out", str(out), "--device", "cpu", "--log-level", "WARNING"]


def test_smoke_suite_end_to_end(releases, capsys):
    r = releases
    out = r["tmp"] / "results.jsonl"
    states = []
    runner.set_trained_state_hook(lambda cell, state: states.append((cell, state)))
    try:
        start = time.time()
        assert run("attack", [*_args(r, out), "--report", str(r["tmp"] / "run_report")]) == 0
        first = time.time() - start
        lines = out.read_text().splitlines()
        assert len(lines) == 18 == len(states)  # 3 adversaries x (5 PMP attackers + 1 dense)
        records = [json.loads(line) for line in lines]
        assert len({rec["id"] for rec in records}) == 18
        for rec in records:
            assert rec["status"] == "ok"
            for key in ("task_loss_before", "task_loss_after", "gain", "pretrain_loss_before",
                        "pretrain_loss_after", "forgetting", "trainable_fraction"):
                assert math.isfinite(rec[key]), (key, rec)
            assert [s for s, _ in rec["curve"]] == [0, 2, 4]
        for rec in records:
            if rec["attacker"] == "recovery_init":
                # complement = 0.9 * W0: recovered except trained entries that landed within 1e-4 of it
                assert rec["iou"] > 0.999
            if rec["attacker"].startswith("recovery"):
                assert 0.0 <= rec["iou"] <= 1.0

        original = load_file(str(r["pmp"] / "model.safetensors"))
        for cell, state in states:
            if cell.role != "pmp" or cell.attacker not in ("authorized", "unauthorized"):
                continue
            changed_out = changed_in = 0
            for name, w in original.items():
                m = r["masks"][name]
                assert state[name].shape == w.shape
                changed_out += int((state[name][~m] != w[~m]).sum())
                changed_in += int((state[name][m] != w[m]).sum())
            assert changed_in > 0, cell.adversary.label
            if cell.attacker == "authorized":
                assert changed_out == 0, (cell.adversary.label, changed_out)  # complement bit-exact
            else:
                assert changed_out > 0, cell.adversary.label

        states.clear()
        start = time.time()
        assert run("attack", _args(r, out)) == 0
        rerun = time.time() - start
        assert out.read_text().splitlines() == lines and not states
        assert rerun < first / 2, (rerun, first)
    finally:
        runner.set_trained_state_hook(None)
    assert "gain ratio" in capsys.readouterr().out

    report_dir = r["tmp"] / "report"
    assert run("attack", ["report", str(out), "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    assert "Best attack per task" in text and "prose_heldout" in text and "Mask recovery" in text
    assert list(report_dir.glob("*.png"))
