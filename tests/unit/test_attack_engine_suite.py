"""The suite's ``engine`` (issue #18), fast: ``hf`` is the default and leaves every cell id as it was;
``megatron`` enters the ids of its cells (the layout does not); what the megatron engine does not run is
refused at load in one line naming the adversary, attacker or task; HF-only executors refuse megatron
suites."""

import copy

import pytest
import yaml

from pmp_megatron.attack import execute
from pmp_megatron.attack.runner import AttackContext
from pmp_megatron.attack.suite import MegatronLayout, expand_cells, load_suite, suite_from_dict
from pmp_megatron.cli import run

FULL = {"method": "full", "optimizer": "adamw", "lr": 1e-4, "steps": 2, "batch_size": 2}
SUITE = {
    "name": "engine",
    "tasks": ["builtin:prose_heldout", {"source": "code_test", "max_docs": 5}],
    "seq_length": 16,
    "seeds": [0, 1],
    "attackers": ["unauthorized", "authorized", "recovery_global"],
    "adversaries": [{**FULL, "optimizer": ["adamw", "sgd"], "lr": {"start": 1e-5, "stop": 1e-3, "num": 3}}],
}
IDS = {"pmp": "p", "dense": "d"}


def _suite(**changes):
    return suite_from_dict({**copy.deepcopy(SUITE), **changes})


def test_hf_is_the_default_and_keeps_the_ids():
    default, explicit = _suite(), _suite(engine="hf")
    assert default.engine == "hf" and default.megatron is None
    ids = [c.id for c in expand_cells(default, IDS, "m")]
    assert ids == [c.id for c in expand_cells(explicit, IDS, "m")]
    # pinned: the first id of the same grid before engines existed (a changed hash orphans results files)
    pinned = suite_from_dict({**copy.deepcopy(SUITE), "adversaries": [
        {**FULL, "optimizer": ["adamw", "sgd"], "lr": {"start": 1e-5, "stop": 1e-3, "num": 3}, "steps": 2,
         "batch_size": 1}, {**FULL, "method": "lora", "lr": 1e-3, "batch_size": 1,
                            "lora": {"rank": [4, 8], "target_modules": ["q_proj"]}}]})
    assert expand_cells(pinned, IDS, "m")[0].id == "ad73507e8f8b9d16"


def test_megatron_enters_its_ids_but_the_layout_does_not():
    hf = expand_cells(_suite(), IDS, "m")
    tp1 = expand_cells(_suite(engine="megatron"), IDS, "m")
    tp2 = expand_cells(_suite(engine="megatron", megatron={"tensor_model_parallel_size": 2,
                                                           "pipeline_model_parallel_size": 2,
                                                           "micro_batch_size": 1}), IDS, "m")
    assert {c.id for c in hf}.isdisjoint(c.id for c in tp1)
    assert [c.id for c in tp1] == [c.id for c in tp2] and len(set(c.id for c in tp1)) == len(tp1)
    assert _suite(engine="megatron").megatron == MegatronLayout()
    assert _suite(engine="megatron", megatron={"tensor_model_parallel_size": 4}).megatron == \
        MegatronLayout(tensor_model_parallel_size=4)


LM_EVAL = ["builtin:prose_heldout", {"kind": "classify", "name": "fam"},
           {"kind": "lm_eval", "source": "pmp_stdlib_family", "train": "fam"}]


@pytest.mark.parametrize("change, named", [
    ({"adversaries": [{**FULL, "method": "lora", "lora": {"rank": 4}}]}, r"adversary lora/adamw/.*LoRA"),
    ({"adversaries": [FULL, {**FULL, "optimizer": "lion"}]}, r"adversary full/lion/lr=0.0001.*lion is"),
    ({"adversaries": [{**FULL, "optimizer": "adafactor"}]}, r"adversary full/adafactor/.*adafactor is"),
    ({"attackers": ["unauthorized", "recovery_gradient"]}, "attacker recovery_gradient"),
    ({"tasks": LM_EVAL}, "task 'pmp_stdlib_family'"),
    ({"megatron": {"tensor_parallel": 2}}, "unknown key 'tensor_parallel' in suite.megatron"),
    ({"megatron": {"tensor_model_parallel_size": 0}}, "megatron.tensor_model_parallel_size must be >= 1"),
])
def test_what_megatron_does_not_run_is_refused_by_name(change, named):
    with pytest.raises(ValueError, match=named):
        _suite(engine="megatron", **change)


def test_engine_values_are_checked():
    with pytest.raises(ValueError, match="suite.engine must be one of hf, megatron"):
        _suite(engine="deepspeed")
    with pytest.raises(ValueError, match="suite.megatron is given but suite.engine is hf"):
        _suite(megatron={"tensor_model_parallel_size": 2})


def test_hf_executors_refuse_a_megatron_suite(tmp_path):
    ctx = AttackContext(suite=_suite(engine="megatron"), models={}, model_ids={})
    with pytest.raises(ValueError, match="engine megatron: its cells run on the job's processes"):
        execute.run_cells([], ctx, tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="not through --slurm"):
        execute.run_cells_slurm([], ctx, tmp_path / "r.jsonl", {})


def test_the_cli_names_the_refused_adversary_in_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "engine": "megatron",
                                    "adversaries": [{**FULL, "optimizer": "lion"}]}))
    assert run("attack", ["--suite", str(path), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adversary full/lion/lr=0.0001/s=2/b=2" in err[0] and str(path) in err[0]
    with pytest.raises(ValueError, match="LoRA"):
        load_suite(_write(tmp_path, {**SUITE, "engine": "megatron",
                                     "adversaries": [{**FULL, "method": "lora"}]}))


def _write(tmp_path, data):
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name, layout", [
    ("megatron-1.1b.yaml", MegatronLayout(1, 1, None)),
    ("megatron-7b.yaml", MegatronLayout(8, 2, 1)),
])
def test_megatron_suites_load_and_state_their_grid(name, layout):
    """The GPU suites validate, and the cell count their header states (the base of the GPU-hours
    arithmetic written beside it) is the grid's."""
    import re

    from pmp_megatron.testing import REPO

    path = REPO / "configs" / "attacks" / name
    suite = load_suite(path)
    assert suite.engine == "megatron" and suite.megatron == layout and suite.decision is not None
    header = path.read_text()
    stated = int(re.search(r"^# cells: .* = (\d+)$", header, re.M).group(1))
    matched = int(re.search(r"^#\s+\(\+ (\d+) with --dense-matched-model\)$", header, re.M).group(1))
    roles = {"pmp": "p", "dense": "d", "scratch": "s"}
    assert len(expand_cells(suite, roles, "mask", "regen")) == stated
    assert len(expand_cells(suite, {**roles, "dense_matched": "m"}, "mask", "regen")) == stated + matched
    assert "GPU-hours" in header and max(a.steps for a in suite.adversaries) == 1000
