"""lm-evaluation-harness as a scoring backend: score a release (or an attacked model in memory) on
lm-eval tasks, fully offline.

``score(model, tasks)`` runs ``lm_eval.simple_evaluate`` with a ``TaskManager`` that indexes the local
task YAMLs of ``configs/evals`` (lm-eval's own registry is scanned only when a requested name is not
local: the scan takes ~20 s). Hub access is switched off for the call (``HF_HUB_OFFLINE=1``,
``HF_DATASETS_OFFLINE=1``, restored afterwards), so a task whose data is neither local nor cached fails
fast with ONE ValueError line naming the task and why.

Local tasks read their data with ``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``; a
relative data file is taken relative to the YAML's folder (lm-eval itself would take it relative to the
working directory), which is why ``score`` hands lm-eval the local configs with those paths resolved.

Shipped tasks (``configs/evals``):

- ``pmp_stdlib_family``: ``attack.classify``'s 300 held-out paragraphs (50 per family) as 6-way
  multiple choice by loglikelihood; metrics ``acc`` and ``acc_norm``. ``write_task_data`` regenerates its
  JSONL (it depends on the Python version whose standard library it reads; see the YAML).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from pmp_megatron.atomic import write_text_atomic
from pmp_megatron.attack import classify
from pmp_megatron.resources import shipped

logger = logging.getLogger(__name__)

EVALS_DIR = shipped("configs", "evals")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub access off for the block: the environment variables, and the constants that
    ``huggingface_hub`` and ``datasets`` read from them at import (when already imported)."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    constants = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                 ("datasets.config", "HF_DATASETS_OFFLINE")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in ((sys.modules.get(m), n) for m, n in constants)
             if mod is not None and hasattr(mod, name)]
    for mod, name, _ in saved:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _local_config(name: str, yaml_path: Path) -> dict | None:
    """The task's config with relative ``data_files`` made absolute (None: leave it to lm-eval)."""
    try:
        cfg = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError:  # lm-eval tags (!function) or includes: lm-eval reads it itself
        return None
    if not isinstance(cfg, dict) or cfg.get("task") != name or "include" in cfg:
        return None
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is None:
        return None

    def resolve(path: str) -> str:
        full = (yaml_path.parent / path).resolve()
        if not full.is_file():
            raise ValueError(f"lm-eval task {name!r} cannot load offline: its data file {full} (from "
                             f"{yaml_path}) does not exist")
        return str(full)

    if isinstance(files, str):
        files = resolve(files)
    elif isinstance(files, dict):
        files = {split: [resolve(p) for p in v] if isinstance(v, list) else resolve(v)
                 for split, v in files.items()}
    else:
        files = [resolve(p) for p in files]
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
    return cfg


def _task_manager(tasks: Sequence[str], include_path: Path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(include_path), include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        also = f" (also unknown: {unknown[1:]})" if unknown[1:] else ""
        raise ValueError(f"lm-eval task {unknown[0]!r} cannot load offline: no such task in {include_path} "
                         f"or lm-eval's registry{also}")
    return manager


def _build_tasks(tasks: Sequence[str], manager, include_path: Path) -> list:
    """One lm-eval Task object per name (their data loaded), or ONE ValueError line for the first that
    cannot load."""
    include = include_path.resolve()
    built = []
    for name in tasks:
        entry = manager.task_index[name]
        spec = name
        if entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(include):
            spec = _local_config(name, Path(entry.yaml_path)) or name
        try:
            loaded = manager.load([spec])
        except Exception as err:  # noqa: BLE001 - any loader failure becomes one line naming the task
            raise ValueError(f"lm-eval task {name!r} cannot load offline: {_first_line(err)}") from None
        built += list(loaded["tasks"].values())
    return built


def _metrics(result: dict, num_samples: dict | None) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for key, value in result.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}/{filt}"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
        else:
            out[name] = None  # lm-eval writes "N/A" for a missing stderr
    if num_samples:
        out["n"] = int(num_samples.get("effective", num_samples.get("original", 0)))
    return out


def check_tasks(tasks: Sequence[str], include_path: str | os.PathLike = EVALS_DIR) -> None:
    """Load ``tasks`` offline (no model): ONE ValueError line naming the first that cannot load, or that
    lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ValueError(f"lm-eval is not installed ({err}): pip install lm-eval (the 'attack' "
                         "extra)") from None
    with offline():
        _build_tasks(list(tasks), _task_manager(list(tasks), Path(include_path)), Path(include_path))


def score(model: str | os.PathLike | object, tasks: Sequence[str],
          include_path: str | os.PathLike = EVALS_DIR, limit: int | float | None = None,
          device: str = "cpu", batch_size: int = 8,
          tokenizer: object | None = None) -> dict[str, dict[str, float | int | None]]:
    """Score ``model`` on lm-eval ``tasks``: ``{task: {metric: value, metric_stderr: value, "n": count}}``.

    ``model`` is an HF model directory (a release), or a loaded ``transformers`` causal LM (an attacked
    model in memory) together with its ``tokenizer``. ``limit`` caps the examples per task (a fraction
    when < 1). Metric names are lm-eval's (``acc``, ``acc_norm``, ...), ``name/filter`` for a filter
    other than ``none``; a stderr lm-eval could not compute is None.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ValueError(f"lm-eval is not installed ({err}): pip install lm-eval (the 'attack' "
                         "extra)") from None
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("score: no lm-eval tasks named")
    include_path = Path(include_path)
    if not include_path.is_dir():
        raise ValueError(f"lm-eval include path {include_path} is not a directory")
    with offline():
        manager = _task_manager(tasks, include_path)
        built = _build_tasks(tasks, manager, include_path)
        if isinstance(model, (str, os.PathLike)):
            if not (Path(model) / "config.json").is_file():
                raise ValueError(f"model directory {model} has no config.json")
            lm = HFLM(pretrained=str(model), device=device, dtype="float32", batch_size=batch_size)
        else:
            if tokenizer is None:
                raise ValueError("score: an in-memory model needs its tokenizer")
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=limit,
                                          log_samples=False)
    return {name: _metrics(results["results"][name], results.get("n-samples", {}).get(name))
            for name in tasks}


# ----------------------------------------------------------------------------- shipped task data


def write_task_data(directory: str | os.PathLike = EVALS_DIR) -> list[Path]:
    """(Re)write the JSONL data of the shipped local tasks; return their paths."""
    path = Path(directory) / "pmp_stdlib_family.jsonl"
    records = classify.lm_eval_records(classify.examples("eval"))
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records]
    write_text_atomic(path, "".join(lines))
    logger.info("wrote %d records to %s (Python %s)", len(records), path, sys.version.split()[0])
    return [path]
