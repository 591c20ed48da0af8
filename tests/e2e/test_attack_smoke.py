"""The attack suite end to end on two tiny HF Llama releases (a synthetic "PMP" one whose complement is
0.9 * W0, and a dense one), through ``pmp-attack``: one JSON line per cell with finite numbers, the
authorized attacker changes only masked-in entries (bit for bit), init regeneration recovers the mask
exactly, a rerun skips every finished cell, and ``pmp-attack report`` writes the report (verdict first)
and plots. Evaluation v2 through the real runner: a release attacked against an identical copy of itself
is never judged to resist; one whose parameters cannot move (lr 0) resists; synthetic and classify cells
give accuracy records; sharing one loaded model between cells gives the records of a fresh load."""

import json
import math
import time

import pytest
import torch
import yaml
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
        assert len(lines) == 84 == len(states)  # 2 tasks x 2 adversaries x 3 seeds x (6 attackers + dense)
        records = [json.loads(line) for line in lines]
        assert len({rec["id"] for rec in records}) == 84
        for rec in records:
            assert rec["status"] == "ok"
            for key in ("task_loss_before", "task_loss_after", "gain", "pretrain_loss_before",
                        "pretrain_loss_after", "forgetting", "trainable_fraction", "score_before",
                        "score_after"):
                assert math.isfinite(rec[key]), (key, rec)
            assert rec["metric"] == {"prose_heldout": "token_acc", "copy": "exact_match"}[rec["task"]]
            assert [s for s, _ in rec["curve"]] == [0, 2, 4]
        for rec in records:
            if rec["attacker"] in ("recovery_init", "recovery_seed_guess"):
                # complement = 0.9 * W0: recovered except trained entries that landed within 1e-4 of it;
                # the seed guesser finds the public seed 42 (a secret seed: tests/unit/test_key_safety.py)
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
    printed = capsys.readouterr().out
    assert printed.startswith("VERDICT: ") and "final_vs_dense" in printed and "gain ratio" not in printed

    report_dir = r["tmp"] / "report"
    assert run("attack", ["report", str(out), "--out", str(report_dir), "--suite", str(SMOKE)]) == 0
    text = (report_dir / "report.md").read_text()
    assert text.startswith("# Verdict: ")
    assert "Best attack per task" in text and "prose_heldout" in text and "Mask recovery" in text
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["verdict"] in ("resists", "does not resist", "inconclusive")
    assert list(report_dir.glob("*.png"))


def _suite(tmp, name, **changes):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(name=name, **changes)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _verdict(out):
    from pmp_megatron.attack import execute, report
    from pmp_megatron.attack.suite import load_suite

    return report.verdict_summary(execute.read_results(out), load_suite(out.with_suffix(".yaml")))


def test_identical_copy_is_never_judged_to_resist(releases):
    """The dense side IS the PMP release: the keyless side also runs a recovery attacker's cells (more
    chances to win), and the verdict must still not be 'resists' (the smoke rule: 'inconclusive')."""
    r = releases
    out = r["tmp"] / "identical.jsonl"
    _suite(r["tmp"], "identical")
    assert run("attack", ["--suite", str(out.with_suffix(".yaml")), "--model", str(r["dense"]),
                          "--dense-model", str(r["dense"]), "--attackers", "unauthorized,recovery_global",
                          "--out", str(out), "--device", "cpu", "--log-level", "WARNING"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 2 * 3 * 3 and {rec["role"] for rec in records} == {"pmp", "dense"}
    v = _verdict(out)
    assert v["verdict"] == "inconclusive", v


def test_parameters_that_cannot_move_resist(releases):
    """lr 0 on the PMP side (it cannot move); the dense side (the same weights) learns the LM task."""
    r = releases
    out = r["tmp"] / "frozen.jsonl"
    _suite(r["tmp"], "frozen", tasks=[{"source": "builtin:prose_heldout", "max_docs": 12, "max_chars": 4000}],
           eval_every=0, eval_blocks=64, eval_batch_size=16, attackers=["unauthorized"],
           adversaries=[{"method": "full", "optimizer": "adamw", "lr": 3.0e-3, "steps": 30, "batch_size": 8}],
           decision={"resists": {"final_vs_dense": {"below": -0.01}},
                     "does_not_resist": {"final_vs_dense": {"above": -0.005}}})
    runner.set_lr_hook(lambda cell, lr: 0.0 if cell.role == "pmp" else lr)
    try:
        assert run("attack", ["--suite", str(out.with_suffix(".yaml")), "--model", str(r["dense"]),
                              "--dense-model", str(r["dense"]), "--out", str(out), "--device", "cpu",
                              "--log-level", "WARNING"]) == 0
    finally:
        runner.set_lr_hook(None)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(rec["score_after"] == rec["score_before"] for rec in records if rec["role"] == "pmp")
    v = _verdict(out)
    assert v["verdict"] == "resists", v


def test_sharing_one_model_gives_the_records_of_a_fresh_load(releases, tmp_path):
    """Synthetic and classify cells give accuracy records; the scratch control runs; and every record
    (losses, scores, curves) is bit-identical whether the cells share one loaded model or load afresh."""
    from pmp_megatron.attack import execute
    from pmp_megatron.attack.run import prepare

    r = releases
    suite = _suite(tmp_path, "shared", scratch=True, eval_every=2, tasks=[
        {"kind": "synthetic", "source": "reverse", "length": 3, "num_train": 32, "num_eval": 16},
        {"kind": "classify", "name": "family", "num_train": 4, "num_eval": 3}])
    cells, ctx = prepare(str(suite), str(r["pmp"]), dense_model=str(r["dense"]), mask=str(r["mask"]),
                         attackers=["unauthorized", "authorized"], device="cpu")
    cells = [c for c in cells if c.seed in (0, 1)]
    volatile = ("wall_s", "finished")

    def records(path, reuse):
        runner.set_model_reuse(reuse)
        try:
            execute.run_cells(cells, ctx, path)
        finally:
            runner.set_model_reuse(True)
        return {rec["id"]: {k: v for k, v in rec.items() if k not in volatile}
                for rec in execute.read_results(path)}

    shared, fresh = records(tmp_path / "shared.jsonl", True), records(tmp_path / "fresh.jsonl", False)
    assert shared == fresh
    assert {rec["role"] for rec in shared.values()} == {"pmp", "dense", "scratch"}
    assert {(rec["task"], rec["metric"]) for rec in shared.values()} == {("reverse", "exact_match"),
                                                                         ("family", "accuracy")}
    for rec in shared.values():
        assert 0.0 <= rec["score_before"] <= 1.0 and 0.0 <= rec["score_after"] <= 1.0
        assert [s for s, _ in rec["score_curve"]] == [0, 2, 4]


def test_adaptive_key_attackers_run_as_cells(releases, tmp_path):
    """recovery_gradient and recovery_stage1 fine-tune with the mask they recovered from the release (their
    own data, their own passes): the record carries their IoU with the true key and a density in (0, 1)."""
    from pmp_megatron.attack import execute
    from pmp_megatron.attack.run import prepare

    r = releases
    suite = _suite(tmp_path, "adaptive", recovery={"adaptive_batches": 4, "stage1_steps": 2},
                   attackers=["recovery_gradient", "recovery_stage1"])
    cells, ctx = prepare(str(suite), str(r["pmp"]), mask=str(r["mask"]), device="cpu")
    cells = [next(c for c in cells if c.seed == 0 and c.attacker == a)
             for a in ("recovery_gradient", "recovery_stage1")]
    out = tmp_path / "adaptive.jsonl"
    execute.run_cells(cells, ctx, out, workers=1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and {rec["status"] for rec in records} == {"ok"}, records
    for rec in records:
        assert 0 < rec["mask_density"] < 1 and 0 <= rec["iou"] <= 1, rec


def test_attack_results_and_report_never_hold_the_secret_seed(releases, tmp_path):
    """With a v2 key carrying a secret 128-bit W0 seed (recovery_init regenerates W0 from it), nothing that
    pmp-attack or pmp-attack report writes -- results, report, summary, plots -- holds the seed."""
    import secrets

    r = releases
    secret = secrets.randbits(128) | (1 << 127)
    masks, meta = maskfile.load(r["mask"])
    key = tmp_path / "private" / "key.safetensors"
    maskfile.save(masks, key, rho=meta["rho"], w0_seed=secret)
    suite = _suite(tmp_path, "secret", attackers=["recovery_init", "recovery_seed_guess"],
                   tasks=[{"kind": "synthetic", "source": "copy", "length": 3, "num_train": 16,
                           "num_eval": 8}],
                   adversaries=[{"method": "full", "optimizer": "adamw", "lr": 1.0e-3, "steps": 2,
                                 "batch_size": 2}], seeds=[0])
    out, report_dir = tmp_path / "results.jsonl", tmp_path / "report"
    assert run("attack", ["--suite", str(suite), "--model", str(r["pmp"]), "--mask", str(key), "--out",
                          str(out), "--device", "cpu", "--log-level", "WARNING"]) == 0
    assert run("attack", ["report", str(out), "--suite", str(suite), "--out", str(report_dir)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {rec["attacker"] for rec in records} == {"recovery_init", "recovery_seed_guess"}
    written = [out, *report_dir.rglob("*")]
    blob = b"".join(p.read_bytes() for p in written if p.is_file())
    for form in (str(secret), hex(secret)[2:], format(secret, "x").upper()):
        assert form.encode() not in blob, form
