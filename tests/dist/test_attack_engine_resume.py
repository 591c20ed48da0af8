"""Attack cells on the megatron engine at TP2, several per job: the release is read once per process for
all its cells; a cell interrupted by SIGUSR2 mid-run saves its state and the job exits 42 (requeue); the
rerun resumes that cell from its step and writes exactly one record per cell, equal to the record of an
uninterrupted run; a saved state is refused at another layout, naming it."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from pmp_megatron.testing import spawn

pytestmark = pytest.mark.dist
SUITE = {
    "name": "resume", "engine": "megatron", "megatron": {"tensor_model_parallel_size": 2},
    "tasks": [{"source": "builtin:prose_heldout", "max_docs": 12, "max_chars": 4000}],
    "seq_length": 32, "eval_blocks": 4, "eval_batch_size": 4, "eval_every": 2, "seeds": [0],
    "attackers": ["unauthorized", "authorized"], "precision": "fp32",
    "adversaries": [{"method": "full", "optimizer": "adamw", "lr": 3.0e-3, "weight_decay": 0.1, "steps": 4,
                     "batch_size": 4}],
}
INTERRUPT = ("authorized", 2)  # the keyed cell (the second), after its step 2 and that step's eval
_STEPS: list = []


def _step_hook(interrupt):
    def hook(cell, step):
        _STEPS.append((cell.attacker, step))
        if interrupt and (cell.attacker, step) == INTERRUPT and int(os.environ["RANK"]) == 0:
            os.kill(os.getpid(), signal.SIGUSR2)  # one rank gets the signal; the ranks agree on it

    return hook


def _run(suite, model, key, out, interrupt):
    """In a spawned rank: run the suite; (exit code, reads of the release logged, steps run) per rank."""
    from pmp_megatron.attack import megatron_engine
    from pmp_megatron.attack.run import prepare
    from pmp_megatron.testing import capture_log_messages

    lines = capture_log_messages()
    megatron_engine.set_step_hook(_step_hook(interrupt))
    cells, ctx = prepare(suite, model, mask=key)
    code = megatron_engine.run_cells(cells, ctx, out)
    return code, sum(line.startswith("read pmp") for line in lines), list(_STEPS)


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_an_interrupted_cell_resumes_and_writes_one_record(tmp_path):
    from pmp_megatron.testing import write_debug_release

    release = write_debug_release(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    args = (str(suite), release["model"], release["key"])
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    cells = out.with_name(out.name + ".cells")

    steps = [(a, s) for a in ("unauthorized", "authorized") for s in range(1, 5)]
    assert spawn(_run, 2, *args, str(ref), False) == [(0, 1, steps)] * 2  # two cells, one read per process
    reference = {r["attacker"]: r for r in _lines(ref)}
    assert len(reference) == 2

    assert [run[0] for run in spawn(_run, 2, *args, str(out), True)] == [42, 42]
    assert [r["attacker"] for r in _lines(out)] == ["unauthorized"]  # the interrupted cell wrote nothing
    saved = [d for d in cells.iterdir() if d.is_dir()]
    assert len(saved) == 1 and (cells / ".requeue").is_file()
    assert json.loads((saved[0] / "complete.json").read_text())["step"] == 2
    assert sorted(p.name for p in saved[0].glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]

    other = tmp_path / "tp1.yaml"  # the same cells (the layout is in no id) at another layout
    other.write_text(yaml.safe_dump({**SUITE, "megatron": {"tensor_model_parallel_size": 1}}))
    with pytest.raises(RuntimeError, match=r"saved by 2 processes at TP, PP, DP \[2, 1, 1\]; this job runs 1"):
        spawn(_run, 1, str(other), release["model"], release["key"], str(out), False)

    resumed = [("authorized", 3), ("authorized", 4)]  # from the saved step, not from the start
    assert spawn(_run, 2, *args, str(out), False) == [(0, 1, resumed)] * 2
    records = _lines(out)
    assert sorted(r["attacker"] for r in records) == ["authorized", "unauthorized"]  # one record per cell
    assert not saved[0].exists()
    for record in records:
        want = reference[record["attacker"]]
        for key in ("id", "curve", "score_curve", "train_loss_first", "train_loss_last", "task_loss_after",
                    "score_after", "tokens", "status"):
            assert record[key] == want[key], (record["attacker"], key)
