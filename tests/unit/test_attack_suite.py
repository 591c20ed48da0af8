"""Attack suite, fast: YAML validation (unknown keys named), grid sizes, log-spaced lrs, stable cell ids,
resumable skipping (sequential and a submitit debug array), the report's numbers on hand-made results,
mask recovery on synthetic tensors, and the authorized complement guard under every optimizer; a release's
identity is its content (not a manifest), the regeneration seed comes from the owner's key, and the
seed-guessing attacker runs as a cell attacker."""

import copy
import json

import pytest
import torch
import yaml

from pmp_megatron.attack import execute, report
from pmp_megatron.attack.optimizers import Lion, build_optimizer
from pmp_megatron.attack.runner import AttackContext, MaskGuard
from pmp_megatron.attack.suite import expand_cells, load_suite, log_spaced, suite_from_dict
from pmp_megatron.config import ModelConfig
from pmp_megatron.release import recovery
from pmp_megatron.testing import REPO

ATTACKS = REPO / "configs" / "attacks"

SMALL = {
    "name": "small",
    "tasks": ["builtin:prose_heldout", {"source": "code_test", "max_docs": 5}],
    "seq_length": 16,
    "seeds": [0, 1],
    "attackers": ["unauthorized", "authorized", "recovery_global"],
    "adversaries": [
        {"method": "full", "optimizer": ["adamw", "sgd"], "lr": {"start": 1e-5, "stop": 1e-3, "num": 3},
         "steps": 2, "batch_size": 1},
        {"method": "lora", "optimizer": "adamw", "lr": 1e-3, "steps": 2, "batch_size": 1,
         "lora": {"rank": [4, 8], "target_modules": ["q_proj"]}},
    ],
}


def _small(**changes):
    data = copy.deepcopy(SMALL)
    data.update(changes)
    return suite_from_dict(data)


# ----------------------------------------------------------------------------- schema and grid


@pytest.mark.parametrize("where, bad, named", [
    ((), "adversaires", "adversaires"),
    (("adversaries", 0), "learning_rate", "learning_rate"),
    (("adversaries", 1, "lora"), "rnak", "rnak"),
    (("recovery",), "dens", "dens"),
])
def test_unknown_key_is_named(where, bad, named):
    data = copy.deepcopy(SMALL)
    data["recovery"] = {}
    node = data
    for key in where:
        node = node[key]
    node[bad] = 1
    with pytest.raises(ValueError, match=f"unknown key '{named}'"):
        suite_from_dict(data)


@pytest.mark.parametrize("change, message", [
    ({"attackers": ["thief"]}, "suite.attackers"),
    ({"tasks": []}, "tasks is empty"),
    ({"adversaries": [{"method": "full", "optimizer": "adam", "lr": 1e-3, "steps": 1, "batch_size": 1}]},
     "optimizer"),
    ({"adversaries": [{"method": "full", "optimizer": "sgd", "lr": -1.0, "steps": 1, "batch_size": 1}]},
     "lr must be > 0"),
    ({"adversaries": [{"method": "full", "optimizer": "sgd", "lr": 1.0, "batch_size": 1}]},
     "missing 'steps'"),
    ({"recovery": {"density": 1.5}}, "density"),
])
def test_bad_values_raise(change, message):
    with pytest.raises(ValueError, match=message):
        _small(**change)


def test_yaml_files_validate_and_full_grid_is_tar_sized():
    full, smoke = load_suite(ATTACKS / "full.yaml"), load_suite(ATTACKS / "smoke.yaml")
    assert len(full.adversaries) >= 26
    assert {a.optimizer for a in full.adversaries} == {"adamw", "sgd", "adafactor", "lion"}
    assert {a.method for a in full.adversaries} == {"full", "lora"}
    assert max(a.steps for a in full.adversaries) == 1000
    cells = expand_cells(full, {"pmp": "p", "dense": "d"}, "mask", "regen")
    for task in full.tasks:
        for attacker in full.attackers:
            advs = {c.adversary for c in cells
                    if c.task == task and c.attacker == attacker and c.role == "pmp"}
            assert len(advs) >= 26
    assert len(cells) == len(full.adversaries) * len(full.tasks) * len(full.seeds) * (len(full.attackers) + 1)
    smoke_cells = expand_cells(smoke, {"pmp": "p", "dense": "d"}, "mask", "regen")
    assert len(smoke_cells) == 84 and max(a.steps for a in smoke.adversaries) <= 8
    for suite in (full, smoke, load_suite(ATTACKS / "results-cpu.yaml")):
        assert suite.decision is not None and len(suite.seeds) >= 3
    results = load_suite(ATTACKS / "results-cpu.yaml")
    assert "prose_heldout" not in [t.name for t in results.tasks] and results.scratch
    assert {t.kind for t in results.tasks} == {"lm", "synthetic", "classify"}
    assert "lm_eval" in {t.kind for t in full.tasks}


# ----------------------------------------------------------------------------- suite v2


@pytest.mark.parametrize("change, named", [
    ({"decision": {"resists": {"final_vs_dens": {"below": 0}}}}, "final_vs_dens"),
    ({"decision": {"resists": {"final_vs_dense": {"under": 0}}}}, "under"),
    ({"decision": {"resist": {}}}, "resist"),
    ({"tasks": [{"kind": "synthetic", "source": "copy", "max_docs": 3}]}, "max_docs"),
    ({"tasks": [{"kind": "synthetc", "source": "copy"}]}, "synthetc"),
    ({"tasks": [{"kind": "synthetic", "source": "sort"}]}, "sort"),
    ({"tasks": [{"kind": "lm_eval", "source": "x"}]}, "train"),
    ({"tasks": ["code_test", {"kind": "lm_eval", "source": "x", "train": "nope"}]}, "nope"),
    ({"scratch": "yes"}, "scratch"),
])
def test_v2_parse_errors_name_the_key(change, named):
    with pytest.raises(ValueError, match=named):
        _small(**change)


def test_v2_tasks_and_controls_expand_with_stable_ids():
    s = _small(tasks=["builtin:prose_heldout", {"source": "code_test", "max_docs": 5}, "synthetic:copy",
                      {"kind": "classify", "num_eval": 10},
                      {"kind": "lm_eval", "source": "pmp_stdlib_family", "train": "stdlib_family"}],
               scratch=True, decision={"resists": {"final_vs_dense": {"below": -0.05}}})
    assert [t.kind for t in s.tasks] == ["lm", "lm", "synthetic", "classify", "lm_eval"]
    assert s.decision.resists[0].statistic == "final_vs_dense"
    ids = {"pmp": "p", "dense": "d", "dense_matched": "m", "scratch": "s"}
    cells = expand_cells(s, ids, "m", None)
    old = expand_cells(_small(), {"pmp": "p", "dense": "d"}, "m", None)
    assert {c.id for c in old} <= {c.id for c in cells}  # v1 cells keep their ids under v2
    assert cells[0].id == "ad73507e8f8b9d16"
    assert len({c.id for c in cells}) == len(cells) == 8 * 2 * 5 * (3 + 3)
    same = expand_cells(_small(), {"pmp": "p", "dense": "p"}, "m", None)  # an identical copy as dense
    assert len({c.id for c in same}) == len(same)


def test_log_spaced_lrs():
    assert log_spaced(1e-5, 1e-3, 3) == [1e-5, 1e-4, 1e-3]
    assert log_spaced(1e-6, 1e-4, 5) == [1e-6, 3.16e-6, 1e-5, 3.16e-5, 1e-4]
    s = _small()
    assert [a.lr for a in s.adversaries if a.optimizer == "sgd"] == [1e-5, 1e-4, 1e-3]
    assert len(s.adversaries) == 2 * 3 + 2  # {adamw, sgd} x 3 lrs + LoRA ranks {4, 8}
    lora = [a for a in s.adversaries if a.method == "lora"]
    assert [(a.lora_rank, a.lora_alpha, a.lora_target_modules) for a in lora] == [
        (4, 8.0, ("q_proj",)), (8, 16.0, ("q_proj",))]


def test_cell_ids_are_stable_and_sensitive():
    s = _small()
    cells = expand_cells(s, {"pmp": "p", "dense": "d"}, "m", None)
    again = expand_cells(_small(), {"pmp": "p", "dense": "d"}, "m", None)
    assert [c.id for c in cells] == [c.id for c in again]
    assert len({c.id for c in cells}) == len(cells) == 8 * 2 * 2 * (3 + 1)
    assert cells[0].id == "ad73507e8f8b9d16"  # pinned: a changed hash would orphan every results file
    other_model = expand_cells(s, {"pmp": "p2", "dense": "d"}, "m", None)
    assert {c.id for c in other_model if c.role == "pmp"}.isdisjoint(c.id for c in cells)
    assert [c.id for c in other_model if c.role == "dense"] == [c.id for c in cells if c.role == "dense"]
    other_mask = expand_cells(s, {"pmp": "p"}, "m2", None)
    changed = {c.attacker for c, o in zip(cells, other_mask, strict=False) if c.id != o.id}
    assert changed == {"authorized"}
    with pytest.raises(ValueError, match="authorized"):
        expand_cells(s, {"pmp": "p"}, None, None)
    assert len(expand_cells(s, {"pmp": "p"}, None, None, attackers=["unauthorized"])) == 8 * 2 * 2


# ----------------------------------------------------------------------------- resumable execution


def _fake_record(cell, ctx):
    return {"id": cell.id, "status": "ok", "gain": 0.5, "role": cell.role}


def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    cells = expand_cells(_small(), {"pmp": "p"}, "m", None, attackers=["unauthorized"])
    results = tmp_path / "results.jsonl"
    with open(results, "w") as f:
        for cell in cells[:5]:
            f.write(json.dumps({"id": cell.id, "status": "ok"}) + "\n")
        f.write('{"id": "torn')  # a killed writer's partial line
    assert [c.id for c in execute.pending_cells(cells, results)] == [c.id for c in cells[5:]]
    ran = []
    monkeypatch.setattr(execute, "run_cell", lambda c, ctx: ran.append(c.id) or _fake_record(c, ctx))
    execute.run_cells(cells, None, results)
    assert ran == [c.id for c in cells[5:]]
    assert execute.done_ids(results) == {c.id for c in cells}
    ran.clear()
    execute.run_cells(cells, None, results)
    assert ran == []


def test_failed_cells_are_not_written(tmp_path, monkeypatch):
    cells = expand_cells(_small(), {"pmp": "p"}, "m", None, attackers=["unauthorized"])[:3]

    def flaky(cell, ctx):
        if cell is cells[1]:
            raise RuntimeError("boom")
        return _fake_record(cell, ctx)

    monkeypatch.setattr(execute, "run_cell", flaky)
    with pytest.raises(RuntimeError, match="1 cell"):
        execute.run_cells(cells, None, tmp_path / "r.jsonl")
    assert execute.done_ids(tmp_path / "r.jsonl") == {cells[0].id, cells[2].id}


def test_slurm_array_shards_and_gathers(tmp_path, monkeypatch):
    cells = expand_cells(_small(), {"pmp": "p"}, "m", None, attackers=["unauthorized"])[:5]
    ctx = AttackContext(suite=_small(), models={"pmp": "p"}, model_ids={"pmp": "p"})
    monkeypatch.setattr(execute, "run_cell", _fake_record)
    results = tmp_path / "r.jsonl"
    opts = execute.parse_slurm_options("cluster=debug,cells_per_task=2,max_concurrent=2,time=0:10:00")
    jobs = execute.run_cells_slurm(cells, ctx, results, opts)
    assert len(jobs) == 3
    assert len(list((tmp_path / "r.jsonl.shards").glob("*.jsonl"))) == 3
    assert [r["id"] for r in execute.read_results(results)] == [c.id for c in cells]
    assert execute.run_cells_slurm(cells, ctx, results, opts) == []


def test_slurm_options():
    opts = execute.parse_slurm_options("partition=gpu,time=1-02:00:00,max_concurrent=8,mem_gb=64")
    assert opts == {"partition": "gpu", "time": "1-02:00:00", "max_concurrent": 8, "mem_gb": 64}
    assert execute._minutes("1-02:00:00") == 26 * 60
    assert execute._minutes("90") == 90 and execute._minutes("1:30:30") == 91
    with pytest.raises(ValueError, match="partitoin"):
        execute.parse_slurm_options("partitoin=gpu")


# ----------------------------------------------------------------------------- report


def _rec(role, attacker, adv, gain, **kw):
    lr = {"A": 1e-4, "B": 1e-3, "C": 1e-2}[adv]
    rec = {"id": f"{role}-{attacker}-{adv}", "status": "ok", "role": role, "model_id": role.upper(),
           "rho": 0.5 if role == "pmp" else None, "suite": "synthetic", "task": "t", "attacker": attacker,
           "adversary": f"full/adamw/lr={lr:g}", "adv_method": "full", "adv_optimizer": "adamw", "adv_lr": lr,
           "adv_lora_rank": None, "seed": 0, "gain": gain, "curve": [[0, 3.0], [5, 3.0 - (gain or 0)]],
           "pretrain_loss_before": 2.2 if role == "pmp" else 2.0, "forgetting": 0.01}
    rec.update(kw)
    return rec


def test_report_numbers_on_synthetic_results(tmp_path):
    records = [
        _rec("pmp", "unauthorized", "A", 0.2), _rec("pmp", "unauthorized", "B", 0.1),
        _rec("pmp", "unauthorized", "C", None, status="diverged"),
        _rec("pmp", "recovery_global", "A", 0.3, iou=0.8), _rec("pmp", "recovery_init", "A", 0.25, iou=1.0),
        _rec("pmp", "authorized", "A", 0.9), _rec("pmp", "authorized", "B", 0.7),
        _rec("dense", "unauthorized", "A", 1.0), _rec("dense", "unauthorized", "B", 0.5),
    ]
    summary = report.write_report(records, tmp_path)
    assert summary["base_loss_ratio"] == pytest.approx(1.1)
    assert summary["gain_ratio"] == {"t": pytest.approx(0.3)}  # best keyless 0.3 / best dense 1.0
    assert summary["authorized_gain_ratio"] == {"t": pytest.approx(0.9)}
    assert summary["recovery_iou"] == {"recovery_global": 0.8, "recovery_init": 1.0}
    assert report.matched_ratios(records, "PMP", "t", "unauthorized") == [pytest.approx(0.2)] * 2
    text = (tmp_path / "report.md").read_text()
    assert "Best attack per task" in text and "Mask recovery" in text and "Diverged cells" in text
    assert (tmp_path / "loss_curves_t.png").stat().st_size > 0
    assert not (tmp_path / "gain_ratio_vs_rho.png").exists()

    rho9 = [dict(r, model_id="PMP9", rho=0.9, id=r["id"] + "9", gain=(r["gain"] or 0) * 2)
            for r in records if r["role"] == "pmp"]
    summary = report.write_report(records + rho9, tmp_path / "two")
    assert [m["rho"] for m in summary["by_model"]] == [0.5, 0.9]
    assert summary["by_model"][1]["gain_ratio"]["t"] == pytest.approx(0.6)
    assert (tmp_path / "two" / "gain_ratio_vs_rho.png").exists()


# ----------------------------------------------------------------------------- recovery


def _tiny_cfg():
    return ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                       ffn_hidden_size=32, vocab_size=64, seed=3)


def _synthetic(complement_scale):
    w0 = dict(recovery.iter_w0(_tiny_cfg()))
    gen = torch.Generator().manual_seed(1)
    true = {n: torch.rand(t.shape, generator=gen) < 0.4 for n, t in w0.items()}
    weights = {n: torch.where(true[n], t + 0.02 * torch.randn(t.shape, generator=gen), complement_scale * t)
               for n, t in w0.items()}
    return w0, true, weights


@pytest.mark.parametrize("scale", [1.0, 0.87])  # frozen complement (= W0), decayed complement (c W0)
@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_init_regeneration_recovers_the_mask_exactly(scale, rule):
    w0, true, weights = _synthetic(scale)
    masks, info = recovery.recover("recovery_init", weights, density=recovery.mask_density(true),
                                   w0=recovery.iter_w0(_tiny_cfg()), init_rule=rule)
    assert recovery.iou(masks, true) == 1.0
    assert info["scale_median"] == pytest.approx(scale)


def test_init_regeneration_refuses_a_wrong_model_config():
    _, _, weights = _synthetic(1.0)
    wrong = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=1,
                        ffn_hidden_size=48, vocab_size=64, seed=3)
    with pytest.raises(ValueError, match="wrong --model-config"):
        recovery.recover("recovery_init", weights, w0=recovery.iter_w0(wrong))


def test_magnitude_recovery_when_the_complement_is_shrunk():
    _, true, weights = _synthetic(0.01)  # the projection shrank the complement 100x
    density = recovery.mask_density(true)
    for attacker in ("recovery_global", "recovery_per_tensor"):
        masks, _ = recovery.recover(attacker, weights, density=density)
        assert recovery.iou(masks, true) > 0.9, attacker
    masks, info = recovery.recover("recovery_global", weights)  # density estimated (Otsu)
    assert info["density_estimate"] == pytest.approx(density, abs=0.05)
    assert recovery.iou(masks, true) > 0.85


def test_kth_largest_is_exact():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(300, generator=gen), torch.rand(7, 9, generator=gen), torch.zeros(50)]
    values = torch.cat([p.reshape(-1) for p in parts]).sort(descending=True).values
    for k in (1, 2, 100, 363, 364, 413):
        assert recovery.kth_largest(parts, k) == values[k - 1].item()


# ----------------------------------------------------------------------------- optimizers, guard


def test_lion_step():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = Lion([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([2.0, -3.0, 0.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([0.9, -0.9, 0.5]))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor", "lion"])
def test_mask_guard_keeps_the_complement_bit_exact(optimizer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    masks = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters()}
    masks["1.bias"] = torch.zeros(4, dtype=torch.bool)  # a tensor entirely outside the mask
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = MaskGuard(model, masks)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        guard.mask_grads()
        opt.step()
        opt.zero_grad()
        guard.restore()
    for n, p in model.named_parameters():
        m = masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        if m.any():
            assert not torch.equal(p.detach()[m], before[n][m]), n


def test_suite_yaml_round_trip(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    assert load_suite(path) == _small()
    with pytest.raises(ValueError, match="does not exist"):
        load_suite(tmp_path / "missing.yaml")


def test_bad_inputs_are_named(tmp_path):
    from safetensors.torch import save_file

    from pmp_megatron.attack import run, tasks
    from pmp_megatron.attack.suite import TaskSpec
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release import reader

    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        tasks.resolve_source(TaskSpec(source="no_such_task"))
    with pytest.raises(ValueError, match="unknown builtin domain"):
        tasks.resolve_source(TaskSpec(source="builtin:nope"))
    assert tasks.resolve_source(TaskSpec(source="code_test")) == "builtin:code_test"
    with pytest.raises(ValueError, match="does not exist or has no config.json"):
        reader.check_model_dir(tmp_path / "missing")
    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text("{}")
    save_file({"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}, str(release / "model.safetensors"))
    maskfile.save({"a.weight": torch.ones(2, 3, dtype=torch.bool)}, tmp_path / "m1", rho=0.5)
    with pytest.raises(ValueError, match=r"missing \['b.weight'\]"):
        run.check_mask_file(str(tmp_path / "m1"), release)
    wrong_shape = {"a.weight": torch.ones(3, 2).bool(), "b.weight": torch.ones(4).bool()}
    maskfile.save(wrong_shape, tmp_path / "m2", rho=0.5)
    with pytest.raises(ValueError, match="'a.weight' has shape"):
        run.check_mask_file(str(tmp_path / "m2"), release)


# ----------------------------------------------------------------------------- release identity and the key


def _tiny_release(tmp_path, name, seed=7, shift=0.0):
    """A PMP-like release of the tiny model (complement 0.01 W0 of ``seed``) and its true mask."""
    from pmp_megatron.release.writer import write_release

    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=64, seed=seed)
    gen = torch.Generator().manual_seed(2)
    weights, true = {}, {}
    for n, w0 in recovery.iter_w0(cfg):
        true[n] = torch.rand(w0.shape, generator=gen) < 0.5
        weights[n] = torch.where(true[n], w0 + 0.02 * torch.randn(w0.shape, generator=gen) + shift, 0.01 * w0)
    return write_release(weights.items(), tmp_path / name, cfg, "float32", {"run": name}), true


def test_new_weights_under_an_old_manifest_are_a_new_model(tmp_path):
    """The identity came from ``release_manifest.json`` when present: weights replaced under the old manifest
    kept the old identity, so every cell read as done (0 pending) though nothing had run on them."""
    from pmp_megatron.attack.runner import model_identity

    old, _ = _tiny_release(tmp_path, "old")
    new, _ = _tiny_release(tmp_path, "new", shift=1e-3)
    for release, owner in ((old, tmp_path / "old.owner"), (new, tmp_path / "old.owner")):
        (release / "release_manifest.json").write_bytes((owner / "release_manifest.json").read_bytes())
    assert model_identity(old) == model_identity(old)  # stable
    assert model_identity(new) != model_identity(old)
    suite = _small(attackers=["unauthorized"])
    done = expand_cells(suite, {"pmp": model_identity(old)})
    results = tmp_path / "results.jsonl"
    for cell in done:
        execute.append_record(results, {"id": cell.id, "status": "ok"})
    pending = execute.pending_cells(expand_cells(suite, {"pmp": model_identity(new)}), results)
    assert len(pending) == len(done) > 0
    before, config = model_identity(new), new / "config.json"  # a config change is a new model too
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    assert model_identity(new) != before


def test_regeneration_seed_comes_from_the_key(tmp_path):
    from pmp_megatron.attack.runner import load_true_mask, regen_config_from_key
    from pmp_megatron.pmp import maskfile

    release, true = _tiny_release(tmp_path, "rel")
    key = tmp_path / "key.safetensors"
    maskfile.save(true, key, rho=0.5, w0_seed=7)
    assert regen_config_from_key(release, str(key)).seed == 7
    assert regen_config_from_key(release, str(key), seed=7).seed == 7
    with pytest.raises(ValueError, match="not the W0 seed in mask file"):
        regen_config_from_key(release, str(key), seed=8)
    assert regen_config_from_key(release, None) is None
    assert regen_config_from_key(release, None, seed=9).seed == 9  # an attacker who knows a public seed
    maskfile.save(true, key, rho=0.5, w0_seed=11, force=True)  # a key replaced at the same path is re-read
    assert load_true_mask(str(key))[1]["w0_seed"] == 11
    assert regen_config_from_key(release, str(key)).seed == 11


def test_seed_guessing_attacker_runs_as_a_cell_attacker(tmp_path):
    from pmp_megatron.attack.runner import AttackContext, attacker_mask, load_model, model_identity
    from pmp_megatron.pmp import maskfile

    release, true = _tiny_release(tmp_path, "rel")
    key = tmp_path / "key.safetensors"
    maskfile.save(true, key, rho=0.5, w0_seed=7)
    suite = _small(attackers=["recovery_seed_guess"], recovery={"seed_guesses": 50})
    ids = {"pmp": model_identity(release)}
    cells = expand_cells(suite, ids)
    assert {c.attacker for c in cells} == {"recovery_seed_guess"}
    assert expand_cells(_small(attackers=["recovery_seed_guess"], recovery={"seed_guesses": 49}), ids)[0].id \
        != cells[0].id
    ctx = AttackContext(suite=suite, models={"pmp": str(release)}, model_ids=ids, mask_path=str(key))
    masks, info = attacker_mask(cells[0], ctx, load_model(release, torch.device("cpu")))
    assert info["seed_found"] and info["iou"] > 0.99 and recovery.iou(masks, true) > 0.99


@pytest.mark.parametrize("attacker", ["unauthorized_frozen_embedding", "authorized_plus_embedding"])
def test_ablation_attackers_train_exactly_their_entries(tmp_path, attacker):
    """The keyless attacker with the input embedding frozen leaves that embedding bit-identical and trains
    everything else; the key widened by the input embedding trains every embedding entry and leaves the
    rest of the complement bit-identical. The keyed ablation is in no headline role."""
    from pmp_megatron.attack import runner, stats
    from pmp_megatron.attack.runner import AttackContext, model_identity, run_cell
    from pmp_megatron.pmp import maskfile
    from pmp_megatron.release.reader import read_weights

    release, true = _tiny_release(tmp_path, "rel")
    key = tmp_path / "key.safetensors"
    maskfile.save(true, key, rho=0.5, w0_seed=7)
    suite = suite_from_dict({
        "name": "ablation", "seq_length": 16, "seeds": [0], "attackers": [attacker],
        "tasks": [{"kind": "synthetic", "source": "copy", "length": 4, "num_train": 32, "num_eval": 8}],
        "adversaries": [{"method": "full", "optimizer": "adamw", "lr": 1e-2, "steps": 3, "batch_size": 4}]})
    ids = {"pmp": model_identity(release)}
    (cell,) = expand_cells(suite, ids, mask_sha256=maskfile.load(key)[1]["sha256"])
    ctx = AttackContext(suite=suite, models={"pmp": str(release)}, model_ids=ids, mask_path=str(key))
    seen = {}
    runner.set_trained_state_hook(lambda c, state: seen.update(state))
    try:
        record = run_cell(cell, ctx)
    finally:
        runner.set_trained_state_hook(None)
    released = read_weights(release)[0]
    emb = runner.INPUT_EMBEDDING
    for name, before in released.items():
        moved = seen[name] != before
        if attacker == "unauthorized_frozen_embedding":
            assert moved.any() == (name != emb), name
        else:
            keep = true[name] | (name == emb)
            assert not moved[~keep].any(), name  # the complement outside the embedding: bit-identical
            if name == emb:
                assert moved[~true[name]].any()  # embedding entries outside the key trained too
    assert record["status"] == "ok"
    assert (stats.record_role(record) is None) == (attacker == "authorized_plus_embedding")
