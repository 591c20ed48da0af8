"""Render, record and submit a pretraining job for Slurm.

One code path, lingua-style: the sbatch script is ``slurm/pretrain.sbatch`` with its ``{{fields}}``
filled in from ``SlurmOptions``; the run directory receives everything needed to reproduce or resume
the run; the script is submitted with ``sbatch`` (``chain`` times, chained by ``--dependency=singleton``).

Run directory layout::

    <run dir>/config.yaml      the resolved config (YAML files + overrides), what every task loads
    <run dir>/pretrain.sbatch  the exact script that was submitted (resubmit it to continue the run)
    <run dir>/git.txt          commit SHA of this checkout and whether it had local changes (a wheel:
                               the installed version)
    <run dir>/git.diff         those local changes (only when there are any)
    <run dir>/jobs.txt         the Slurm job ids, one per line, appended on each submission
    <run dir>/logs/            %x-%j.out per job (appended across requeues)
    <run dir>/checkpoints/     checkpoint.dir, unless the config names one

A dry run renders the script without touching the disk or Slurm; without an explicit run directory it
shows ``<run-dir>`` in its place, so the output depends only on the arguments (golden-testable).

Every value rendered into the script is checked first (no control characters: a newline would end the
``#SBATCH`` block or start a shell command) and then escaped for where it lands: ``|sh`` fields are
shell-quoted, ``|sbatch`` fields are quoted for sbatch's own ``#SBATCH`` parser (which splits on
whitespace, honours quotes and backslashes, and ends the line at an unquoted ``#``), and ``|sbatch_pattern``
fields also double ``%`` so that ``--output`` does not read a ``%`` of the path as a filename pattern.

Passthrough: ``--qos``, ``--constraint``, ``--exclusive``, ``--mem``, ``--reservation``, ``--exclude`` and any
other ``#SBATCH`` option (``sbatch_options``) become lines of the ``#SBATCH`` block, ``srun_options`` are
added last to the trainer step's srun, and ``container_mounts`` are bind-mounted (pyxis) besides the run
directory. An option must be one long option, ``KEY[=VALUE]``; one that pmp-launch renders itself is refused
(its own flag sets it, or the requeue contract needs it as it is).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pmp_megatron.atomic import write_text_atomic
from pmp_megatron.config import Config, load_config, save_config
from pmp_megatron.resources import recipe, shipped, source_tree

__all__ = [
    "REQUEUE_EXIT_CODE", "RUN_DIR_PLACEHOLDER", "TEMPLATE", "SlurmOptions", "Launch",
    "render_template", "render_sbatch", "resolve_config", "write_run_dir", "submit", "launch",
    "sbatch_escape", "sbatch_pattern", "check_text", "check_run_dir",
]

TEMPLATE = shipped("slurm", "pretrain.sbatch")  # from the checkout or the installed package
RUN_DIR_PLACEHOLDER = "<run-dir>"
REQUEUE_EXIT_CODE = 42  # the trainer's "checkpoint saved, requeue me" exit code

_FIELD = re.compile(r"\{\{(\w+)(?:\|(\w+))?\}\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LONG_OPTION = re.compile(r"(?:--)?([a-z][a-z0-9]+(?:-[a-z0-9]+)*)(?:=(.+))?")
# #SBATCH options the template writes: a flag of pmp-launch sets them, or the requeue contract needs them
_RENDERED_SBATCH = {
    "job-name": "--job-name", "nodes": "--nodes", "ntasks-per-node": "--ntasks-per-node",
    "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task", "partition": "--partition",
    "account": "--account", "time": "--time", "qos": "--qos", "constraint": "--constraint",
    "exclusive": "--exclusive", "mem": "--mem", "reservation": "--reservation", "exclude": "--exclude",
    "output": "--run-dir", "open-mode": None, "signal": "--requeue-signal-seconds", "requeue": None,
    "dependency": "--chain",
}
_RENDERED_SRUN = {"container-image": "--container-image", "container-mounts": "--container-mount",
                  "container-workdir": None}
_SBATCH_SPECIAL = re.compile(r"""[\s'"#\\]""")


def sbatch_escape(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line (unchanged when it holds nothing special).

    sbatch splits those lines on whitespace, groups quoted text, takes a backslash as "the next character
    is literal" and ends the line at an unquoted ``#`` (older versions: at any ``#`` not escaped). A
    backslash does not keep a space in the argument, so such a value is double-quoted, with ``\\``,
    ``"`` and ``#`` escaped inside the quotes.
    """
    if not _SBATCH_SPECIAL.search(value):
        return value
    return '"' + re.sub(r'([\\"#])', r"\\\1", value) + '"'


def sbatch_pattern(value: str) -> str:
    """``value`` as a literal part of an ``--output``/``--error`` filename pattern: ``%`` doubled."""
    return sbatch_escape(value.replace("%", "%%"))


_FILTERS = {"sh": shlex.quote, "sbatch": sbatch_escape, "sbatch_pattern": sbatch_pattern}


def check_text(name: str, value: str) -> str:
    """ValueError naming ``name`` when ``value`` holds a control character (newline, NUL, tab, ...)."""
    bad = _CONTROL.search(value)
    if bad is not None:
        raise ValueError(f"{name} must not contain control characters (found {bad.group()!r}): {value!r}")
    return value


@dataclass
class SlurmOptions:
    """What the job asks Slurm for. ``None`` leaves the matching ``#SBATCH`` line out."""

    nodes: int  # nodes in the allocation
    gpus_per_node: int  # GPUs per node (0: CPU-only, no --gpus-per-node request)
    ntasks_per_node: int | None = None  # tasks (ranks) per node; default one per GPU
    partition: str | None = None  # Slurm partition
    account: str | None = None  # Slurm account to charge
    time: str | None = None  # time limit per job segment, e.g. 04:00:00
    container_image: str | None = None  # pyxis/enroot image for srun --container-image
    cpus_per_task: int | None = None  # CPU cores per rank (data loader workers)
    job_name: str | None = None  # job name, also the singleton chain key; default pmp-<config stem>
    requeue_signal_seconds: int = 300  # USR2 this many seconds before the time limit
    chain: int = 1  # number of back-to-back job segments to queue
    trainer: str = "pmp-pretrain"  # the command each task runs (before --config ...)
    qos: str | None = None  # quality of service
    constraint: str | None = None  # node features the job needs, e.g. a100&ib
    exclusive: bool = False  # whole nodes, shared with no other job
    mem: str | None = None  # memory per node, e.g. 500G (0: all of it)
    reservation: str | None = None  # run inside this reservation
    exclude: str | None = None  # nodes never to run on, e.g. node[01-04]
    sbatch_options: tuple[str, ...] = ()  # more #SBATCH options, each KEY[=VALUE] (--sbatch-option)
    srun_options: tuple[str, ...] = ()  # more options of the trainer's srun, each KEY[=VALUE] (--srun-option)
    container_mounts: tuple[str, ...] = ()  # SRC:DST[:FLAGS] mounted besides the run dir (--container-mount)

    @property
    def tasks_per_node(self) -> int:
        """Ranks per node."""
        return self.gpus_per_node if self.ntasks_per_node is None else self.ntasks_per_node

    @property
    def world_size(self) -> int:
        """Total ranks of the job."""
        return self.nodes * self.tasks_per_node

    def validate(self) -> SlurmOptions:
        """Raise ValueError naming the first bad option; return self."""
        checks = [
            (self.nodes >= 1, f"nodes must be >= 1, got {self.nodes}"),
            (self.gpus_per_node >= 0, f"gpus_per_node must be >= 0, got {self.gpus_per_node}"),
            (self.tasks_per_node >= 1,
             f"ntasks_per_node must be >= 1, got {self.tasks_per_node} (set it when gpus_per_node is 0)"),
            (self.cpus_per_task is None or self.cpus_per_task >= 1,
             f"cpus_per_task must be >= 1, got {self.cpus_per_task}"),
            (self.requeue_signal_seconds >= 1,
             f"requeue_signal_seconds must be >= 1, got {self.requeue_signal_seconds}"),
            (self.chain >= 1, f"chain must be >= 1, got {self.chain}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("partition", "account", "time", "job_name", "container_image", "qos", "constraint",
                     "mem", "reservation", "exclude"):
            value = getattr(self, name)
            if value is not None and (not value or re.search(r"\s", value)):
                raise ValueError(f"{name} must be a non-empty word without whitespace, got {value!r}")
            if value is not None:
                check_text(name, value)
        if not shlex.split(check_text("trainer", self.trainer)):
            raise ValueError("trainer must be a non-empty command")
        self.sbatch_lines()
        self.srun_args()
        self.mounts()
        return self

    def sbatch_lines(self) -> list[str]:
        """``sbatch_options`` as ``--key[=value]`` arguments of the ``#SBATCH`` block."""
        return [long_option("--sbatch-option", item, _RENDERED_SBATCH) for item in self.sbatch_options]

    def srun_args(self) -> list[str]:
        """``srun_options`` as ``--key[=value]`` arguments of the trainer's srun."""
        return [long_option("--srun-option", item, _RENDERED_SRUN) for item in self.srun_options]

    def mounts(self) -> list[str]:
        """``container_mounts``, each checked to be ``SRC:DST[:FLAGS]`` (pyxis' format)."""
        if self.container_mounts and self.container_image is None:
            raise ValueError("--container-mount needs --container-image (mounts are made in the container)")
        for item in self.container_mounts:
            check_text("--container-mount", item)
            src, sep, rest = item.partition(":")
            if not src or not sep or not rest.partition(":")[0] or "," in item:
                raise ValueError(f"--container-mount {item!r} must look like SRC:DST[:FLAGS] (pyxis' format; "
                                 f"no ',', which separates mounts)")
        return list(self.container_mounts)


def long_option(flag: str, item: str, rendered: Mapping[str, str | None]) -> str:
    """``item`` (``KEY[=VALUE]``, a leading ``--`` allowed) as ``--key[=value]``; ValueError naming ``flag``
    when it is not one long option, or is one that pmp-launch renders itself."""
    check_text(flag, item)
    match = _LONG_OPTION.fullmatch(item)
    if match is None:
        raise ValueError(f"{flag} {item!r} must look like KEY=VALUE or KEY, one long option (e.g. "
                         f"mail-type=END)")
    key, value = match.groups()
    if key in rendered:
        own = rendered[key]
        why = f"use {own}" if own else "the requeue contract sets it"
        raise ValueError(f"{flag} {item!r}: pmp-launch renders --{key} itself ({why})")
    return f"--{key}" if value is None else f"--{key}={value}"


def render_template(template: str, fields: Mapping[str, str | None]) -> str:
    """Fill ``{{name}}`` (verbatim), ``{{name|sh}}`` (shell-quoted), ``{{name|sbatch}}`` (escaped for an
    ``#SBATCH`` line) and ``{{name|sbatch_pattern}}`` (that, with ``%`` doubled) fields.

    A line with a field whose value is None is dropped, so optional ``#SBATCH`` lines disappear. A value
    with a control character is refused (ValueError naming the field).
    """
    lines = []
    for line in template.splitlines(keepends=True):
        matches = list(_FIELD.finditer(line))
        for m in matches:
            if m.group(1) not in fields:
                raise ValueError(f"sbatch template field '{m.group(1)}' is not one of {sorted(fields)}")
            if m.group(2) is not None and m.group(2) not in _FILTERS:
                raise ValueError(f"sbatch template filter '{m.group(2)}' is not one of {sorted(_FILTERS)}")
        if any(fields[m.group(1)] is None for m in matches):
            continue
        lines.append(_FIELD.sub(lambda m: _FILTERS.get(m.group(2), str)(
            check_text(m.group(1), str(fields[m.group(1)]))), line))
    return "".join(lines)


def check_run_dir(run_dir: str, container_image: str | None) -> str:
    """ValueError naming ``run_dir`` for a path the script cannot carry intact."""
    check_text("run_dir", run_dir)
    if "\\" in run_dir:  # in an --output pattern a backslash turns off %x/%j expansion
        raise ValueError(f"run_dir must not contain a backslash (sbatch --output reads it as 'no patterns'): "
                         f"{run_dir!r}")
    if container_image is not None and re.search(r"[,:]", run_dir):
        raise ValueError(f"run_dir must not contain ',' or ':' with container_image (it is passed to "
                         f"--container-mounts, which splits on them): {run_dir!r}")
    return run_dir


def render_sbatch(options: SlurmOptions, run_dir: str | Path | None = None,
                  overrides: Sequence[str] = (), template: str | None = None) -> str:
    """The sbatch script for ``options``; ``run_dir`` None shows ``<run-dir>`` instead of a path."""
    options.validate()
    if options.job_name is None:
        raise ValueError("job_name is required to render the script (launch() derives one from the config)")
    text = TEMPLATE.read_text() if template is None else template
    if run_dir is not None:
        check_run_dir(str(run_dir), options.container_image)
    for item in overrides:
        check_text(f"override {item!r}", item)
    fields = {
        "job_name": options.job_name,
        "nodes": str(options.nodes),
        "ntasks_per_node": str(options.tasks_per_node),
        "gpus_per_node": str(options.gpus_per_node) if options.gpus_per_node else None,
        "cpus_per_task": None if options.cpus_per_task is None else str(options.cpus_per_task),
        "partition": options.partition,
        "account": options.account,
        "time": options.time,
        "container_image": options.container_image,
        "requeue_signal_seconds": str(options.requeue_signal_seconds),
        "run_dir": RUN_DIR_PLACEHOLDER if run_dir is None else str(run_dir),
        "overrides": shlex.join(overrides),
        "trainer": shlex.join(shlex.split(options.trainer)),
        "qos": options.qos,
        "constraint": options.constraint,
        "exclusive": "" if options.exclusive else None,
        "mem": options.mem,
        "reservation": options.reservation,
        "exclude": options.exclude,
        "sbatch_options": " ".join(sbatch_escape(a) for a in options.sbatch_lines()) or None,
        "srun_options": shlex.join(options.srun_args()) or None,
        "container_mounts": ",".join(options.mounts()) or None,
    }
    return render_template(text, fields)


def resolve_config(config_paths: Sequence[str | Path], overrides: Sequence[str], world_size: int,
                   run_dir: Path | None = None) -> Config:
    """Load and validate the config for ``world_size`` ranks; checkpoints default to ``run_dir``."""
    if not config_paths:
        raise ValueError("at least one config file is required (--config X.yaml)")
    for path in config_paths:
        if not recipe(path).is_file():
            raise ValueError(f"config file {path} does not exist")
    cfg = load_config(list(config_paths), overrides, world_size=world_size)
    if cfg.checkpoint.dir is None and run_dir is not None:
        cfg.checkpoint.dir = str(run_dir / "checkpoints")
    return cfg


def _git(repo: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def write_run_dir(run_dir: Path, cfg: Config, script: str) -> Path:
    """Write config.yaml, pretrain.sbatch, git.txt (+ git.diff) and logs/ into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    script_path = run_dir / "pretrain.sbatch"
    write_text_atomic(script_path, script, mode=0o755)
    write_provenance(run_dir)
    return script_path


def write_provenance(run_dir: Path) -> None:
    """git.txt (+ git.diff): the commit and local changes of the checkout the package runs from; for an
    installed wheel, its version (the git state of whatever directory it sits in would be another
    project's)."""
    repo = source_tree()
    if repo is None:
        from importlib.metadata import version

        installed = f"package pmp_megatron {version('pmp_megatron')} (installed)"
        write_text_atomic(run_dir / "git.txt", f"commit unknown\ndirty unknown\n{installed}\n")
        return
    sha = (_git(repo, "rev-parse", "HEAD") or "unknown").strip()
    diff = _git(repo, "diff", "HEAD") or ""
    write_text_atomic(run_dir / "git.txt", f"commit {sha}\ndirty {bool(diff)}\nrepo {repo}\n")
    if diff:
        write_text_atomic(run_dir / "git.diff", diff)


def submit(script_path: Path, chain: int = 1) -> list[str]:
    """``sbatch`` the script ``chain`` times (its singleton dependency runs them in order); job ids."""
    job_ids = []
    for _ in range(chain):
        proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script_path} failed ({proc.returncode}): {proc.stderr.strip()}")
        job_ids.append(proc.stdout.strip().split(";")[0])
    with open(script_path.parent / "jobs.txt", "a") as f:
        f.write("".join(f"{j}\n" for j in job_ids))
    return job_ids


@dataclass
class Launch:
    """What ``launch`` did: the script, the config, and (unless a dry run) the run dir and job ids."""

    script: str
    config: Config
    run_dir: Path | None = None
    job_ids: list[str] = field(default_factory=list)


def launch(config_paths: Sequence[str | Path], options: SlurmOptions, overrides: Sequence[str] = (),
           run_dir: str | Path | None = None, dry_run: bool = False) -> Launch:
    """Resolve the config, render the script, write the run dir and submit (or only render: dry run).

    The default run dir is ``runs/<job name>-<YYYYmmdd-HHMMSS>`` under the current directory.
    """
    if options.job_name is None and config_paths:
        options = dataclasses.replace(options, job_name=f"pmp-{Path(config_paths[0]).stem}")
    options.validate()
    if run_dir is None and not dry_run:
        run_dir = Path("runs") / f"{options.job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir is not None:
        check_run_dir(str(run_dir), options.container_image)
    run_dir = None if run_dir is None else Path(run_dir).resolve()
    cfg = resolve_config(config_paths, overrides, options.world_size, run_dir)
    script = render_sbatch(options, run_dir, overrides)
    if dry_run:
        return Launch(script=script, config=cfg, run_dir=run_dir)
    script_path = write_run_dir(run_dir, cfg, script)
    return Launch(script=script, config=cfg, run_dir=run_dir, job_ids=submit(script_path, options.chain))
