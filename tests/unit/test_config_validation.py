"""Config validation gaps that used to be accepted and failed (or silently misbehaved) mid-run: each bad
value raises one ValueError naming the field; YAML files with a duplicate key or non-UTF-8 bytes name the
file; removed fields are refused unless they hold the value every older saved config holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from pmp_megatron.config import Config, config_from_dict, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "model" / "debug.yaml"
BASE = ["pmp.rho=0.5", "optim.lr_warmup_steps=0"]


@pytest.mark.parametrize("field", ["optim.lr", "optim.min_lr", "pmp.discovery.lr"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "-1e-4"])
def test_learning_rates_must_be_finite_and_non_negative(field, value):
    overrides = [f"{field}={value}"]
    if field == "optim.min_lr" and value == ".inf":
        overrides.append("optim.lr=1.0")
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(DEBUG, BASE + overrides)


@pytest.mark.parametrize("field", ["optim.adam_beta1", "optim.adam_beta2"])
@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5", ".nan"])
def test_adam_betas_in_unit_interval(field, value):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(DEBUG, BASE + [f"{field}={value}"])


def test_adam_beta_zero_is_allowed():
    assert load_config(DEBUG, BASE + ["optim.adam_beta1=0"]).optim.adam_beta1 == 0.0


def test_min_lr_above_lr_is_refused():
    with pytest.raises(ValueError, match=r"optim\.min_lr .* optim\.lr"):
        load_config(DEBUG, BASE + ["optim.lr=1e-4", "optim.min_lr=1e-3"])


@pytest.mark.parametrize("split", ["abc", "", "98;1;1", "1e-3,1,1", "1,2,3,4", "-1,1,1", "0,0,0", "98,,1"])
def test_data_split_that_does_not_parse(split):
    with pytest.raises(ValueError, match=r"data\.split"):
        load_config(DEBUG, BASE + [f"data.split='{split}'"])


@pytest.mark.parametrize("split", ["98,1,1", "90, 10, 0", "100,1", "0.9,0.1,0"])
def test_data_split_that_parses(split):
    assert load_config(DEBUG, BASE + [f"data.split='{split}'"]).data.split == split


def test_negative_keep_last():
    with pytest.raises(ValueError, match=r"checkpoint\.keep_last"):
        load_config(DEBUG, BASE + ["checkpoint.keep_last=-1"])
    assert load_config(DEBUG, BASE + ["checkpoint.keep_last=0"]).checkpoint.keep_last == 0


def test_eval_steps_zero_with_evaluation_on():
    with pytest.raises(ValueError, match=r"train\.eval_steps"):
        load_config(DEBUG, BASE + ["train.eval_steps=0", "train.eval_interval=10"])
    off = load_config(DEBUG, BASE + ["train.eval_steps=0", "train.eval_interval=0"])
    assert off.train.eval_steps == 0


def test_evaluation_needs_a_validation_share():
    with pytest.raises(ValueError, match=r"data\.split.*train\.eval_interval"):
        load_config(DEBUG, BASE + ["data.split=100,0,0", "train.eval_interval=10"])
    assert load_config(DEBUG, BASE + ["data.split=100,0,0", "train.eval_interval=0"])


def test_negative_eval_interval():
    with pytest.raises(ValueError, match=r"train\.eval_interval"):
        load_config(DEBUG, BASE + ["train.eval_interval=-5"])


def test_negative_num_workers():
    with pytest.raises(ValueError, match=r"data\.num_workers"):
        load_config(DEBUG, BASE + ["data.num_workers=-1"])
    assert load_config(DEBUG, BASE + ["data.num_workers=0"]).data.num_workers == 0


@pytest.mark.parametrize("override", ["model.rotary_base=.inf", "pmp.projection_radius=.nan",
                                      "optim.clip_grad=-1", "optim.weight_decay=-0.1", "optim.adam_eps=0",
                                      "optim.loss_scale=0"])
def test_other_numbers_that_would_fail_mid_run(override):
    with pytest.raises(ValueError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(DEBUG, BASE + [override])


def test_duplicate_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_layers: 4\n")
    with pytest.raises(ValueError, match=r"dup\.yaml:4: duplicate key 'num_layers' \(first given at line 2"):
        load_config(bad, BASE)
    top = tmp_path / "top.yaml"
    top.write_text("pmp: {rho: 0.5}\ninclude: [dup.yaml]\npmp: {rho: 0.2}\n")
    with pytest.raises(ValueError, match=r"top\.yaml:3: duplicate key 'pmp'"):
        load_config(top, BASE)


def test_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  <<: {num_layers: 2, hidden_size: 64}\n  num_layers: 4\n")
    assert load_config(path, BASE).model.num_layers == 4


def test_non_utf8_yaml_names_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  num_layers: 2\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.yaml:3: not valid UTF-8"):
        load_config(bad, BASE)


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(Exception, match=r"broken\.yaml"):
        load_config(bad, BASE)


def test_removed_fields_are_refused():
    with pytest.raises(ValueError, match=r"data\.corpus' was removed"):
        load_config(DEBUG, BASE + ["data.corpus=builtin:code"])
    with pytest.raises(ValueError, match=r"checkpoint\.async_save' was removed"):
        load_config(DEBUG, BASE + ["checkpoint.async_save=true"])
    assert not hasattr(Config().data, "corpus") and not hasattr(Config().checkpoint, "async_save")


def test_config_saved_before_the_removal_still_loads():
    old = config_to_dict(load_config(DEBUG, BASE))
    old["data"]["corpus"] = "builtin:prose"
    old["checkpoint"]["async_save"] = False
    assert config_from_dict(old) == load_config(DEBUG, BASE)


def test_save_config_is_atomic(tmp_path, monkeypatch):
    cfg = load_config(DEBUG, BASE)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    before = path.read_bytes()

    def broken_dump(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pmp_megatron.config.yaml.safe_dump", broken_dump)
    with pytest.raises(RuntimeError, match="disk full"):
        save_config(cfg, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_discovery_save_interval_is_not_negative():
    with pytest.raises(ValueError, match=r"pmp\.discovery\.save_interval"):
        load_config(DEBUG, BASE + ["pmp.discovery.save_interval=-1"])
    assert load_config(DEBUG, BASE + ["pmp.discovery.save_interval=0"]).pmp.discovery.save_interval == 0


@pytest.mark.parametrize("name", ["pmp.projection_intervall", "optim.lr", "pmp", "pmp.discovery",
                                  "pmp.discovery.save_interval"])
def test_allow_changes_names_fields_compared_on_resume(name):
    match = rf"checkpoint\.allow_changes: '{name}' is not a model\.\* or pmp\.\*"
    with pytest.raises(ValueError, match=match):
        load_config(DEBUG, BASE + [f"checkpoint.allow_changes=[{name}]"])


@pytest.mark.parametrize("name", ["pmp.mode", "pmp.rho", "model.seed", "model.hidden_size"])
def test_allow_changes_refuses_fields_no_resume_may_change(name):
    with pytest.raises(ValueError, match=rf"checkpoint\.allow_changes: {name} cannot change on resume"):
        load_config(DEBUG, BASE + [f"checkpoint.allow_changes=[{name}]"])


def test_allow_changes_accepts_known_fields():
    names = ["pmp.projection_interval", "pmp.complement", "model.recompute_granularity"]
    cfg = load_config(DEBUG, BASE + [f"checkpoint.allow_changes=[{','.join(names)}]"])
    assert cfg.checkpoint.allow_changes == names


@pytest.mark.parametrize("overrides, named", [
    (["pmp.complement=redraw", "pmp.projection=true"], r"pmp\.complement=redraw and pmp\.projection"),
    (["pmp.complement=redraw", "train.train_steps=10", "pmp.redraw_interval=4"], r"pmp\.redraw_interval"),
    (["pmp.redraw_interval=0"], r"pmp\.redraw_interval"),
    (["pmp.projection_rms=0"], r"pmp\.projection_rms"),
    (["pmp.projection_shrink=-1"], r"pmp\.projection_shrink"),
    (["pmp.discovery.adam_beta2=1.0"], r"pmp\.discovery\.adam_beta2"),
    (["pmp.discovery.ema_beta=1.0"], r"pmp\.discovery\.ema_beta"),
    (["pmp.discovery.warmup_steps=-1"], r"pmp\.discovery\.warmup_steps"),
    (["pmp.discovery.embedding=trainable", "pmp.rho=1.0"], r"pmp\.discovery\.embedding=trainable"),
    (["pmp.discovery.score=sum"], r"pmp\.discovery\.score"),
    (["pmp.discovery.batch=micro", "parallel.pipeline_model_parallel_size=2",
      "parallel.virtual_pipeline_model_parallel_size=2", "model.num_layers=4"],
     r"pmp\.discovery\.batch=micro"),
])
def test_recipe_options_that_cannot_combine_fail_before_compute(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_config(DEBUG, BASE + overrides)
    # the same options in a valid combination load
    assert load_config(DEBUG, BASE + ["pmp.complement=redraw", "train.train_steps=8",
                                      "pmp.redraw_interval=4"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_redraw_with_half_params_and_the_distributed_optimizer_fails_before_compute(dtype):
    """The redraw draws from whole tensors, and the distributed optimizer's fp32 copies are shares: the
    combination is refused by Config.validate, naming the fields, before Stage I runs; each field changed
    alone loads, and frozen / projection (which edit the shares) load with it."""
    half, distopt = f"model.params_dtype={dtype}", "parallel.use_distributed_optimizer=true"
    redraw = ["pmp.complement=redraw", "train.train_steps=8", "pmp.redraw_interval=4"]
    named = r"pmp\.complement=redraw.*parallel\.use_distributed_optimizer=false"
    with pytest.raises(ValueError, match=named):
        load_config(DEBUG, BASE + redraw + [half, distopt])
    for ok in [[half], [distopt]]:
        assert load_config(DEBUG, BASE + redraw + ok)
    for policy in (["pmp.complement=frozen"], ["pmp.projection=true"],
                   ["pmp.complement=frozen", "pmp.projection=true"]):
        assert load_config(DEBUG, BASE + policy + [half, distopt])
