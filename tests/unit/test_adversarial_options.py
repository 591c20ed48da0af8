"""``pmp.adversarial``: bad settings fail in ``Config.validate`` naming the fields (a proxy that is an
evaluated task, outside PMP mode, where it cannot run); the proxy rows and each step's draw are
deterministic and keep the probe apart from the inner steps' rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmp_megatron.config import load_config, task_identity
from pmp_megatron.data.proxy import load_proxy

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "model" / "debug.yaml"
ON = ["pmp.rho=0.5", "optim.lr_warmup_steps=0", "pmp.adversarial.enabled=true",
      "pmp.adversarial.proxy=[synthetic:reverse:4]",
      "pmp.adversarial.evaluation_tasks=[builtin:code_test,synthetic:copy:8,classify:stdlib_family]"]


def test_a_valid_adversarial_config_loads():
    a = load_config(DEBUG, ON).pmp.adversarial
    assert a.enabled and a.proxy == ["synthetic:reverse:4"] and a.inner_lr == [1e-4, 1e-3]


@pytest.mark.parametrize("proxy,named", [
    ("synthetic:copy", "synthetic:copy:8"),  # another length of an evaluated synthetic task
    ("builtin:code_test", "builtin:code_test"),
    ("code_test", "builtin:code_test"),  # the bare domain name is the builtin domain
    ("classify:stdlib_family", "classify:stdlib_family"),
])
def test_a_proxy_that_is_an_evaluated_task_is_refused_naming_both(proxy, named):
    with pytest.raises(ValueError, match=rf"pmp\.adversarial\.proxy '{proxy}' overlaps "
                                         rf"pmp\.adversarial\.evaluation_tasks '{named}'"):
        load_config(DEBUG, [*ON, f"pmp.adversarial.proxy=[synthetic:reverse,{proxy}]"])


def test_a_jsonl_proxy_is_the_same_task_by_path(tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    assert task_identity(str(data)) == task_identity(str(tmp_path / "." / "task.jsonl"))
    with pytest.raises(ValueError, match="overlaps"):
        load_config(DEBUG, [*ON, f"pmp.adversarial.proxy=[{data}]",
                            f"pmp.adversarial.evaluation_tasks=[{tmp_path}/./task.jsonl]"])


@pytest.mark.parametrize("overrides,named", [
    (["pmp.mode=dense"], "pmp.adversarial.enabled needs pmp.mode=pmp"),
    (["parallel.use_distributed_optimizer=true"], "parallel.use_distributed_optimizer=false"),
    (["pmp.adversarial.proxy=[]"], r"pmp\.adversarial\.proxy is empty"),
    (["pmp.adversarial.evaluation_tasks=[]"], r"pmp\.adversarial\.evaluation_tasks is empty"),
    (["pmp.adversarial.inner_lr=[1e-3,1e-4]"], r"pmp\.adversarial\.inner_lr"),
    (["pmp.adversarial.inner_lr=[0.0,1e-4]"], r"pmp\.adversarial\.inner_lr"),
    (["pmp.adversarial.inner_lr=[1e-4]"], r"pmp\.adversarial\.inner_lr"),
    (["pmp.adversarial.inner_lr=[1e-4,.inf]"], r"pmp\.adversarial\.inner_lr"),
    (["pmp.adversarial.inner_steps=0"], r"pmp\.adversarial\.inner_steps must be >= 1"),
    (["pmp.adversarial.interval=0"], r"pmp\.adversarial\.interval must be >= 1"),
    (["pmp.adversarial.penalty_weight=-1"], r"pmp\.adversarial\.penalty_weight must be >= 0"),
    (["pmp.adversarial.objective=kl"], r"pmp\.adversarial\.objective"),
])
def test_bad_adversarial_settings_fail_naming_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_config(DEBUG, [*ON, *overrides])


def test_off_by_default_and_unchecked_when_off():
    cfg = load_config(DEBUG, ["pmp.rho=0.5", "pmp.adversarial.proxy=[builtin:code_test]",
                              "pmp.adversarial.evaluation_tasks=[builtin:code_test]"])
    assert not cfg.pmp.adversarial.enabled


def test_synthetic_proxy_rows_are_deterministic_and_padded_to_a_multiple_of_8():
    a = load_proxy(["synthetic:reverse:4", "synthetic:recall:3"], 40, 500, 64)
    b = load_proxy(["synthetic:reverse:4", "synthetic:recall:3"], 40, 500, 64)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    assert len(a) == 80 and (a.tokens.shape[1] - 1) % 8 == 0
    assert a.loss_mask[:40].sum(1).eq(4).all() and a.loss_mask[40:].sum(1).eq(1).all()  # the targets only
    batch = a.microbatches(torch.tensor([0, 41]), 2)[0]
    assert torch.equal(batch["labels"], a.tokens[[0, 41], 1:])
    assert torch.equal(batch["loss_mask"].bool(), a.loss_mask[[0, 41], 1:])


def test_text_proxy_rows_are_blocks_of_the_training_tokenizer(tmp_path):
    from pmp_megatron.data.tokenizer import Tokenizer
    from pmp_megatron.testing import tiny_sentencepiece

    tok = Tokenizer(tiny_sentencepiece(tmp_path))
    rows = load_proxy(["builtin:prose_heldout"], 6, tok.vocab_size, 32, tok)
    assert rows.tokens.shape == (6, 33) and rows.loss_mask[:, 1:].all() and not rows.loss_mask[:, 0].any()
    with pytest.raises(ValueError, match=r"pmp\.adversarial\.proxy 'builtin:prose_heldout' is text"):
        load_proxy(["builtin:prose_heldout"], 6, tok.vocab_size, 32)
    with pytest.raises(ValueError, match=r"pmp\.adversarial\.proxy 'synthetic:sort'"):
        load_proxy(["synthetic:sort"], 6, 500, 32)


def test_each_step_draws_its_own_lr_and_rows_with_the_probe_apart():
    from pmp_megatron.train.adversarial import draw

    cfg = load_config(DEBUG, [*ON, "pmp.adversarial.inner_lr=[1e-4,1e-2]", "pmp.adversarial.inner_steps=3"])
    plans = [draw(cfg, step, 100) for step in range(1, 30)]
    again = draw(cfg, 1, 100)
    assert again.lr == plans[0].lr and torch.equal(again.rows, plans[0].rows)
    lrs = [p.lr for p in plans]
    assert all(1e-4 <= x <= 1e-2 for x in lrs) and len(set(lrs)) == len(lrs)
    assert min(lrs) < 1e-3 < max(lrs)  # log-uniform over two decades
    for p in plans:
        assert p.rows.shape == (3, 8) and p.probe.shape == (8,)
        assert not set(p.probe.tolist()) & set(p.rows.flatten().tolist())
    small = draw(cfg, 1, 12)  # fewer rows than the steps take: epochs over the rows the probe leaves
    assert not set(small.probe.tolist()) & set(small.rows.flatten().tolist())
    other_seed = load_config(DEBUG, [*ON, "train.seed=7"])
    assert draw(other_seed, 1, 100).lr != draw(load_config(DEBUG, ON), 1, 100).lr


def test_the_adversarial_recipe_is_accumulated_plus_its_own_section_and_names_the_suites_tasks():
    from pmp_megatron.attack.suite import load_suite
    from pmp_megatron.config import config_to_dict

    pmp_dir = ROOT / "configs" / "pmp"
    recipe, base = load_config(pmp_dir / "adversarial.yaml"), load_config(pmp_dir / "accumulated.yaml")
    a, b = config_to_dict(recipe), config_to_dict(base)
    assert a["pmp"].pop("adversarial") != b["pmp"].pop("adversarial")
    assert a == b  # only pmp.adversarial differs
    adv = recipe.pmp.adversarial
    assert adv.enabled and (adv.interval, adv.inner_steps, adv.inner_lr) == (2, 8, [1e-4, 1e-3])
    declared = {task_identity(t) for t in adv.evaluation_tasks}
    for suite_file in ("recipes-cpu.yaml", "adversarial-cpu.yaml", "adversarial-cpu-cut.yaml",
                       "adversarial-smoke.yaml"):
        suite = load_suite(ROOT / "configs" / "attacks" / suite_file)
        for task in [*suite.tasks, suite.pretraining_eval]:
            spelled = {"lm": task.source, "synthetic": f"synthetic:{task.source}",
                       "classify": f"classify:{task.name}"}[task.kind]
            assert task_identity(spelled) in declared, (suite_file, spelled)
    assert not declared & {task_identity(p) for p in adv.proxy}


def test_trackers_get_the_keyless_statistics_but_not_the_keys():
    from pmp_megatron.train.tracking import scalars

    record = {"stage": "train", "step": 2, "loss": 3.0, "adversarial_lr": 1e-3, "adversarial_keyless": 5.1,
              "adversarial_key_loss": 2.5}
    assert scalars(record) == {"train/loss": 3.0, "train/adversarial_lr": 1e-3,
                               "train/adversarial_keyless": 5.1}


def test_inner_batch_not_split_over_the_data_parallel_ranks_fails_before_compute():
    from pmp_megatron.config import load_config as load

    ok = [*ON, "train.micro_batch_size=2", "train.global_batch_size=16", "pmp.adversarial.inner_batch_size=8"]
    assert load(DEBUG, ok, world_size=4).pmp.adversarial.inner_batch_size == 8  # 8 = 2 x DP 4
    with pytest.raises(ValueError, match=r"pmp\.adversarial\.inner_batch_size \(8\) must be divisible by "
                                         r"train\.micro_batch_size \* data-parallel size \(2 \* 8\)"):
        load(DEBUG, ok, world_size=8)


def test_the_cut_grid_is_the_preregistered_one_without_copy():
    """adversarial-cpu-cut.yaml (the departure the adversarial report names) differs from the pre-registered
    grid by its copy task only."""
    import dataclasses

    from pmp_megatron.attack.suite import load_suite

    full = load_suite(ROOT / "configs" / "attacks" / "adversarial-cpu.yaml")
    cut = load_suite(ROOT / "configs" / "attacks" / "adversarial-cpu-cut.yaml")
    assert [t for t in full.tasks if t.name != "copy"] == cut.tasks and len(full.tasks) == len(cut.tasks) + 1
    assert dataclasses.replace(full, tasks=cut.tasks) == cut
