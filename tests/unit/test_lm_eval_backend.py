"""lm-evaluation-harness as a scoring backend, offline: a tiny random Llama release scored on the shipped
local task, the same numbers for the model in memory, one-line errors for tasks that cannot load, and
the committed task data matching its generator."""

import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from pmp_megatron.attack import lm_eval_backend  # noqa: E402
from pmp_megatron.testing import tiny_sentencepiece  # noqa: E402

TASK = "pmp_stdlib_family"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random LlamaForCausalLM with a sentencepiece tokenizer, saved like a release."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pmp_megatron.release.tokenizer import vocab_size, write_tokenizer

    out = tmp_path_factory.mktemp("release")
    sp_model = tiny_sentencepiece(out / "..", vocab_size=500)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size(sp_model), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    write_tokenizer(sp_model, out, model_max_length=2048)
    return out


def test_score_a_release_offline_on_the_local_task(release):
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    result = lm_eval_backend.score(release, [TASK], limit=24)
    metrics = result[TASK]
    assert metrics["n"] == 24
    for name in ("acc", "acc_norm"):
        p = metrics[name]
        assert 0.0 <= p <= 1.0 and p * 24 == pytest.approx(round(p * 24))
        assert metrics[f"{name}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 23))  # sample sd / sqrt(n)
    assert {k: os.environ.get(k) for k in env} == env  # offline mode is switched off again


def test_an_in_memory_model_scores_like_its_directory(release):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(release)
    in_memory = lm_eval_backend.score(model, [TASK], limit=12, tokenizer=tokenizer)
    from_dir = lm_eval_backend.score(release, [TASK], limit=12)
    assert in_memory[TASK]["acc"] == pytest.approx(from_dir[TASK]["acc"])
    with pytest.raises(ValueError, match="needs its tokenizer"):
        lm_eval_backend.score(model, [TASK])


def _task_yaml(directory, name, data):
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n{data}\noutput_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{{{text}}}}'\n"
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")


def test_a_task_that_cannot_load_offline_is_one_line_naming_it(tmp_path, release):
    _task_yaml(tmp_path, "hub_only", "dataset_path: pmp-nonexistent-org/never-cached")
    _task_yaml(tmp_path, "no_data", "dataset_path: json\ndataset_kwargs: {data_files: {test: gone.jsonl}}")
    with pytest.raises(ValueError) as err:
        lm_eval_backend.score(release, ["hub_only"], include_path=tmp_path)
    message = str(err.value)
    assert message.startswith("lm-eval task 'hub_only' cannot load offline: ") and "\n" not in message
    with pytest.raises(ValueError, match=r"'no_data' cannot load offline: its data file .*gone.jsonl") as err:
        lm_eval_backend.score(release, ["no_data"], include_path=tmp_path)
    assert "\n" not in str(err.value)


def test_an_unknown_task_is_one_line_naming_it(release):
    with pytest.raises(ValueError, match="task 'pmp_no_such_task' cannot load offline: no such task") as err:
        lm_eval_backend.score(release, ["pmp_no_such_task"])
    assert "\n" not in str(err.value)


def test_committed_task_data_matches_its_generator(tmp_path):
    shipped = lm_eval_backend.EVALS_DIR / f"{TASK}.jsonl"
    records = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert len(records) == 300 and {r["label"] for r in records} == set(range(6))
    assert all(0 <= r["label"] < len(r["choices"]) for r in records)
    if sys.version.split()[0] != "3.12.1":
        pytest.skip("the shipped data was written from Python 3.12.1's standard library")
    (path,) = lm_eval_backend.write_task_data(tmp_path)
    assert path.read_bytes() == shipped.read_bytes()


def test_pmp_eval_scores_a_release_with_a_shipped_task_offline(release, tmp_path, capsys):
    """``pmp-eval``: the same numbers as the backend, written as JSON and a table, offline."""
    from pmp_megatron import cli

    out = tmp_path / "eval"
    assert cli.run("eval", [str(release), "--tasks", TASK, "--limit", "12", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["tasks"] == lm_eval_backend.score(release, [TASK], limit=12)
    acc = record["tasks"][TASK]["acc"]
    table = (out / "eval.md").read_text()
    assert f"| {TASK} | acc | {acc:.4f} |" in table and table in capsys.readouterr().out


def test_pmp_eval_names_a_task_that_cannot_load_before_loading_the_model(tmp_path, release, capsys):
    from pmp_megatron import cli

    _task_yaml(tmp_path, "no_data", "dataset_path: json\ndataset_kwargs: {data_files: {test: gone.jsonl}}")
    code = cli.run("eval", [str(release), "--tasks", "no_data", "--include-path", str(tmp_path),
                            "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pmp-eval: error: lm-eval task 'no_data'" in err
    assert not (tmp_path / "out").exists()
    assert cli.run("eval", [str(tmp_path), "--tasks", TASK]) == 2  # no config.json: not a release
    assert "has no config.json" in capsys.readouterr().err
