"""Tests for pmp_megatron.config: schema, merging precedence, includes, round-trips and validation errors."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import yaml

from pmp_megatron.config import (
    Config,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL_YAMLS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
PMP_YAMLS = sorted((ROOT / "configs" / "pmp").glob("*.yaml"))
DEBUG = ROOT / "configs" / "model" / "debug.yaml"
REFERENCE = ROOT / "configs" / "pmp" / "reference.yaml"
RHO = ["pmp.rho=0.5"]  # the defaults leave rho unset, which pmp mode rejects


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_recipes_exist():
    assert {p.name for p in MODEL_YAMLS} >= {"debug.yaml", "llama-125m.yaml", "tinyllama-1.1b.yaml",
                                             "llama-7b.yaml"}
    assert {p.name for p in PMP_YAMLS} >= {"reference.yaml", "frozen.yaml", "dense.yaml"}


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.name)
def test_model_yaml_validates(path):
    cfg = load_config(path, RHO)
    assert isinstance(cfg, Config)
    tp = cfg.parallel.tensor_model_parallel_size
    assert cfg.model.padded_vocab_size(tp) % (cfg.model.make_vocab_size_divisible_by * tp) == 0


@pytest.mark.parametrize("path", PMP_YAMLS, ids=lambda p: p.name)
def test_pmp_yaml_validates(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("model,pmp", list(itertools.product(MODEL_YAMLS, PMP_YAMLS)),
                         ids=lambda p: p.stem)
def test_model_x_pmp_combinations(tmp_path, model, pmp):
    combo = _write(tmp_path / "combo.yaml", {"include": [str(model), str(pmp)]})
    via_include = load_config(combo)
    assert via_include == load_config([model, pmp])
    assert via_include.model == load_config(model, RHO).model
    assert via_include.pmp == load_config(pmp).pmp


def test_reference_recipe_values():
    cfg = load_config(REFERENCE)
    # the reference code's effective defaults (its command line overrides its dataclass): rho 0.9
    assert (cfg.pmp.mode, cfg.pmp.rho, cfg.pmp.complement, cfg.pmp.projection) == ("pmp", 0.9, "decay", True)
    assert (cfg.pmp.projection_target, cfg.pmp.projection_radius, cfg.pmp.projection_interval) == (
        "radius", 2.0, 400)
    d = cfg.pmp.discovery
    assert (d.max_steps, d.iou_threshold, d.patience, d.lr, d.clip_grad) == (500, 0.99, 5, 2e-5, 1.0)
    # Stage I: one micro-batch per step, AdamW betas (0.9, 0.999), one step's |g| ranked globally
    assert (d.batch, d.adam_beta1, d.adam_beta2, d.warmup_steps) == ("micro", 0.9, 0.999, 0)
    assert (d.score, d.quota, d.embedding) == ("grad", "global", "masked")
    half = load_config(ROOT / "configs" / "pmp" / "reference-rho0.5.yaml")
    assert half.pmp.rho == 0.5 and half.optim == cfg.optim and half.pmp.discovery == d
    o = cfg.optim
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.weight_decay) == (2e-5, 0.9, 0.95, 0.1)
    assert (o.lr_decay_style, o.lr_warmup_steps, o.clip_grad) == ("cosine", 2000, 1.0)
    t = cfg.train
    assert (t.micro_batch_size, t.global_batch_size, t.train_steps) == (4, 32, 20000)
    frozen = load_config(ROOT / "configs" / "pmp" / "frozen.yaml")
    assert (frozen.pmp.complement, frozen.pmp.projection, frozen.pmp.rho) == ("frozen", False, 0.5)
    dense = load_config(ROOT / "configs" / "pmp" / "dense.yaml")
    assert dense.pmp.mode == "dense" and dense.optim == cfg.optim
    # one mechanism per variant recipe: each differs from reference-rho0.5.yaml in exactly its own fields
    variants = {"accumulated": {"pmp.discovery.score"},
                "ema": {"pmp.discovery.score", "pmp.discovery.ema_beta"},
                "per-tensor": {"pmp.discovery.quota"}, "embedding-trainable": {"pmp.discovery.embedding"},
                "stage1-global-batch": {"pmp.discovery.batch"},
                "frozen": {"pmp.complement", "pmp.projection"},
                "redraw": {"pmp.complement", "pmp.redraw_interval", "pmp.projection"},
                "sizefree-projection": {"pmp.projection_target", "pmp.projection_rms"}}
    base = config_to_dict(half)
    for name, fields in variants.items():
        variant = config_to_dict(load_config(ROOT / "configs" / "pmp" / f"{name}.yaml"))
        changed = {f"{section}.{key}" for section in base for key in base[section]
                   if base[section][key] != variant[section][key]
                   and not isinstance(base[section][key], dict)}
        changed |= {f"pmp.discovery.{k}" for k in base["pmp"]["discovery"]
                    if base["pmp"]["discovery"][k] != variant["pmp"]["discovery"][k]}
        # ema_beta keeps its default value in ema.yaml; a field set to its default does not show as changed
        assert changed <= fields and changed, (name, changed)
    tiny = load_config([ROOT / "configs" / "model" / "tinyllama-1.1b-seq256.yaml", REFERENCE])
    assert tiny.model.seq_length == 256 and tiny.model.hidden_size == 2048


def test_tinyllama_reference_sizes():
    m = load_config(ROOT / "configs" / "model" / "tinyllama-1.1b.yaml", RHO).model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups) == (2048, 22, 32, 4)
    assert (m.ffn_hidden_size, m.vocab_size, m.seq_length) == (5632, 32000, 2048)
    assert m.untie_embeddings is True
    assert m.norm_epsilon == 1e-5 and isinstance(m.norm_epsilon, float)
    assert m.rotary_base == 10000.0
    assert m.head_dim == 64


def test_llama7b_layout():
    cfg = load_config(ROOT / "configs" / "model" / "llama-7b.yaml", RHO, world_size=8)
    assert cfg.parallel.tensor_model_parallel_size == 8 and cfg.parallel.sequence_parallel
    assert cfg.model.params_dtype == "bfloat16" and cfg.model.norm_epsilon == 1e-6
    assert cfg.data_parallel_size(8) == 1 and cfg.num_microbatches(8) == 8


def test_debug_supports_interleaved_pipeline():
    cfg = load_config(DEBUG, RHO + ["parallel.pipeline_model_parallel_size=2",
                                    "parallel.virtual_pipeline_model_parallel_size=2"], world_size=4)
    assert cfg.data_parallel_size(4) == 2


def test_defaults():
    cfg = load_config(None, RHO)
    assert cfg == config_from_dict({"pmp": {"rho": 0.5}})
    assert cfg.model == ModelConfig()
    assert cfg.model.padded_vocab_size(1) == 512 and cfg.model.padded_vocab_size(8) == 1024
    assert ModelConfig(vocab_size=32000, make_vocab_size_divisible_by=128).padded_vocab_size(1) == 32000
    assert ModelConfig(vocab_size=50257, make_vocab_size_divisible_by=128).padded_vocab_size(2) == 50432


def test_precedence_defaults_yaml_overrides():
    cfg = load_config(DEBUG, RHO + ["model.hidden_size=128", "--optim.lr=1e-4", "data.cache_dir=null"])
    assert cfg.model.hidden_size == 128  # override beats YAML
    assert cfg.model.num_layers == 4  # YAML beats default
    assert cfg.model.rotary_base == 10000.0  # default kept
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.cache_dir is None


def test_override_value_parsing():
    cfg = load_config(None, RHO + ["model.rotary_base=500000", "parallel.sequence_parallel=false",
                                   "data.data_path=[0.3, a, 0.7, b]",
                                   "pmp.discovery.patience=3", "checkpoint.dir=/tmp/ck"])
    assert cfg.model.rotary_base == 500000.0 and isinstance(cfg.model.rotary_base, float)
    assert cfg.data.data_path == [0.3, "a", 0.7, "b"]
    assert cfg.pmp.discovery.patience == 3 and cfg.checkpoint.dir == "/tmp/ck"


def test_include_resolution(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(sub / "base.yaml", {"model": {"num_layers": 6, "hidden_size": 96}, "pmp": {"rho": 0.25}})
    _write(sub / "mid.yaml", {"include": ["base.yaml"], "model": {"num_layers": 8}})
    top = _write(tmp_path / "top.yaml", {"include": ["sub/mid.yaml"], "model": {"num_attention_heads": 8,
                                                                               "num_query_groups": 4}})
    cfg = load_config(top)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (8, 96, 8)
    assert cfg.pmp.rho == 0.25
    assert load_config(top, ["model.num_layers=2"]).model.num_layers == 2


def test_round_trip_dict():
    cfg = load_config([DEBUG, REFERENCE], ["data.data_path=[1, p]"])
    d = config_to_dict(cfg)
    assert isinstance(d["pmp"]["discovery"], dict)
    assert config_from_dict(d) == cfg
    assert config_to_dict(config_from_dict(d)) == d


def test_save_then_load(tmp_path):
    cfg = load_config([DEBUG, REFERENCE], ["optim.adam_eps=1e-8", "model.fp8=hybrid",
                                           "model.transformer_impl=transformer_engine"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_module_does_not_import_torch():
    import pmp_megatron.config  # noqa: F401

    src = (ROOT / "pmp_megatron" / "config.py").read_text()
    assert "import torch" not in src and "megatron.core" not in src
    assert "print(" not in src
    assert "pmp_megatron.config" in sys.modules


# ----------------------------------------------------------------------------- errors name the field

BAD_OVERRIDES = [
    (["model.num_layer=2"], r"unknown config field 'model\.num_layer'.*model\.num_layers"),
    (["modle.num_layers=2"], r"unknown config field 'modle'"),
    (["pmp.discovery.patiense=2"], r"pmp\.discovery\.patiense"),
    (["model.num_layers=abc"], r"config field 'model\.num_layers' expects int, got str 'abc'"),
    (["model.num_layers=2.5"], r"model\.num_layers.*expects int"),
    (["model.num_layers=true"], r"model\.num_layers.*expects int"),
    (["parallel.sequence_parallel=1"], r"config field 'parallel\.sequence_parallel' expects bool, got int 1"),
    (["model.transformer_impl=apex"], r"model\.transformer_impl.*one of"),
    (["model=3"], r"config section 'model' expects a mapping"),
    (["model.num_query_groups=3"], r"model\.num_attention_heads.*model\.num_query_groups"),
    (["model.hidden_size=66"], r"model\.hidden_size.*model\.num_attention_heads"),
    (["parallel.tensor_model_parallel_size=8"],
     r"parallel\.tensor_model_parallel_size.*model\.num_attention_heads"),
    (["parallel.tensor_model_parallel_size=4"],
     r"parallel\.tensor_model_parallel_size.*model\.num_query_groups"),
    (["parallel.pipeline_model_parallel_size=3"],
     r"parallel\.pipeline_model_parallel_size.*model\.num_layers"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"],
     r"parallel\.virtual_pipeline_model_parallel_size"),
    (["parallel.virtual_pipeline_model_parallel_size=2"],
     r"parallel\.virtual_pipeline_model_parallel_size requires parallel\.pipeline_model_parallel_size"),
    (["parallel.sequence_parallel=true"], r"parallel\.sequence_parallel.*tensor_model_parallel_size"),
    (["pmp.rho=null"], r"pmp\.rho is required"),
    (["pmp.rho=0"], r"pmp\.rho must be in \(0, 1\]"),
    (["pmp.rho=1.5"], r"pmp\.rho must be in \(0, 1\]"),
    (["model.fp8=hybrid"], r"model\.fp8.*model\.transformer_impl"),
    (["pmp.projection_radius=0"], r"pmp\.projection_radius"),
    (["pmp.projection_interval=0"], r"pmp\.projection_interval"),
    (["pmp.discovery.patience=0"], r"pmp\.discovery\.patience"),
    (["pmp.discovery.iou_threshold=0"], r"pmp\.discovery\.iou_threshold"),
    (["pmp.discovery.iou_threshold=1.01"], r"pmp\.discovery\.iou_threshold"),
    (["train.global_batch_size=30"], r"train\.global_batch_size.*train\.micro_batch_size"),
    (["model.num_layers"], r"override 'model\.num_layers' must look like"),
]


@pytest.mark.parametrize("overrides,match", BAD_OVERRIDES, ids=lambda x: x[0] if isinstance(x, list) else "")
def test_bad_override_raises_one_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(DEBUG, RHO + overrides)


def test_rho_optional_in_dense_mode():
    assert load_config(DEBUG, ["pmp.mode=dense"]).pmp.rho is None


def test_world_size_checks():
    ok = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    assert load_config(DEBUG, RHO + ok, world_size=8).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match=r"world size 6 .*parallel\.tensor_model_parallel_size"):
        load_config(DEBUG, RHO + ok, world_size=6)
    with pytest.raises(ValueError, match=r"train\.global_batch_size.*data-parallel size"):
        load_config(DEBUG, RHO + ["train.global_batch_size=12"], world_size=2)


def test_unknown_key_in_yaml(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "model:\n  num_layers: 2\n  hiden_size: 64\n")
    with pytest.raises(ValueError, match=r"unknown config field 'model\.hiden_size'.*model\.hidden_size"):
        load_config(bad, RHO)
    top = _write(tmp_path / "top.yaml", "include: [bad.yaml]\n")
    with pytest.raises(ValueError, match=r"model\.hiden_size"):
        load_config(top, RHO)


def test_wrong_type_in_yaml(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "parallel:\n  use_distributed_optimizer: 'yes'\n")
    with pytest.raises(ValueError, match=r"parallel\.use_distributed_optimizer' expects bool, got str"):
        load_config(bad, RHO)


def test_include_cycle(tmp_path):
    _write(tmp_path / "a.yaml", "include: [b.yaml]\nmodel: {num_layers: 2}\n")
    _write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(ValueError, match=r"include cycle"):
        load_config(tmp_path / "a.yaml", RHO)
    _write(tmp_path / "self.yaml", "include: [self.yaml]\n")
    with pytest.raises(ValueError, match=r"include cycle"):
        load_config(tmp_path / "self.yaml", RHO)


def test_diamond_include_is_not_a_cycle(tmp_path):
    _write(tmp_path / "base.yaml", "pmp: {rho: 0.3}\n")
    _write(tmp_path / "l.yaml", "include: [base.yaml]\n")
    _write(tmp_path / "r.yaml", "include: [base.yaml]\n")
    top = _write(tmp_path / "top.yaml", "include: [l.yaml, r.yaml]\n")
    assert load_config(top).pmp.rho == 0.3


def test_warmup_longer_than_training_is_refused():
    from pmp_megatron.config import config_from_dict

    with pytest.raises(ValueError, match="optim.lr_warmup_steps"):
        config_from_dict({"pmp": {"mode": "dense"}, "train": {"train_steps": 10},
                          "optim": {"lr_warmup_steps": 10}})


def test_w0_seed_is_secret_by_default():
    assert ModelConfig().seed is None and load_config(None, RHO).model.seed is None
    assert load_config(None, [*RHO, "model.seed=42"]).model.seed == 42  # a public seed, given on purpose
    big = 2**127 + 12345  # a drawn seed is 128 bits: a saved config keeps it exactly
    assert config_from_dict({"pmp": {"rho": 0.5}, "model": {"seed": big}}).model.seed == big


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_do_not_pin_a_public_w0_seed(path):
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    assert not isinstance(model, dict) or "seed" not in model, f"{path} pins model.seed: W0 would be public"


def test_resume_differences_name_model_and_pmp_fields():
    from pmp_megatron.config import resume_differences

    saved = config_to_dict(load_config(REFERENCE, ["model.seed=7"]))
    assert resume_differences(saved, load_config(REFERENCE, ["model.seed=7"])) == []
    # model.seed None (the default) takes the checkpoint's seed; another int does not match it.
    assert resume_differences(saved, load_config(REFERENCE)) == []
    assert resume_differences(saved, load_config(REFERENCE, ["model.seed=8"])) == [("model.seed", 7, 8)]
    new = load_config(REFERENCE, ["pmp.rho=0.5", "pmp.discovery.patience=3", "optim.lr=1.0e-4",
                                  "parallel.tensor_model_parallel_size=2", "pmp.discovery.save_interval=7"])
    assert resume_differences(saved, new) == [("pmp.rho", 0.9, 0.5), ("pmp.discovery.patience", 5, 3)]


def test_resume_differences_fill_fields_a_checkpoint_predates():
    from pmp_megatron.config import resume_differences

    saved = config_to_dict(load_config(REFERENCE))
    del saved["pmp"]["discovery"]["save_interval"]
    assert resume_differences(saved, load_config(REFERENCE)) == []
