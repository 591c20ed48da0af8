"""Every command of pmp_megatron behind ONE dispatcher.

    python -m pmp_megatron <command> [--debug] ...      (or the console script pmp-<command>)

=============  ===================================================================================
pretrain       PMP pretraining or the dense baseline, under torchrun/srun (``cli/pretrain.py``)
export-mask    the owner's private key of a PMP checkpoint (``cli/release.py``)
release        the public Hugging Face release of a checkpoint; ``--audit`` (``cli/release.py``)
attack         the fine-tune attack suite and its report (``cli/attack.py``)
launch         Slurm submission (``cli/launch.py``)
quickstart     the whole loop on the debug model on CPU (``cli/quickstart.py``)
dense-matched  the dense control whose base loss matches a PMP run's (``cli/dense_matched.py``)
preprocess     tokenizer + Megatron indexed dataset from JSONL, text or builtins (``cli/preprocess.py``)
eval           lm-evaluation-harness on a release, offline (``cli/evaluate.py``)
import-hf      a Hugging Face Llama directory -> a checkpoint to start training from (``cli/import_hf.py``)
=============  ===================================================================================

A user error (a bad value, a missing or refused file, a full disk) prints ONE line naming the file or
field and exits 2; ``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import errno
import importlib
import sys
from collections.abc import Callable

# command -> "module:function"; each function takes argv and returns an exit code (or None for 0)
COMMANDS: dict[str, str] = {
    "pretrain": "pmp_megatron.cli.pretrain:main",
    "export-mask": "pmp_megatron.cli.release:export_mask",
    "release": "pmp_megatron.cli.release:release",
    "attack": "pmp_megatron.cli.attack:main",
    "launch": "pmp_megatron.cli.launch:main",
    "quickstart": "pmp_megatron.cli.quickstart:main",
    "dense-matched": "pmp_megatron.cli.dense_matched:main",
    "preprocess": "pmp_megatron.cli.preprocess:main",
    "eval": "pmp_megatron.cli.evaluate:main",
    "import-hf": "pmp_megatron.cli.import_hf:main",
}

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError,
                                                 NotADirectoryError, IsADirectoryError, PermissionError)


def _resolve(command: str) -> Callable:
    module, func = COMMANDS[command].split(":")
    return getattr(importlib.import_module(module), func)


def user_error_message(err: BaseException) -> str | None:
    """The one line shown for a user error, or None when ``err`` is a bug (shown with its traceback)."""
    checkpoint = sys.modules.get("pmp_megatron.train.checkpoint")  # not imported: err can't be one of its
    known = (*USER_ERRORS, checkpoint.CheckpointError) if checkpoint else USER_ERRORS
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on device{where}: free space or point the output elsewhere"
    if isinstance(err, known):
        text = str(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
            text = f"{text}: {err.filename}"
        return " ".join(text.split())  # one line
    return None


def run(command: str, argv: list[str]) -> int:
    """Run one command with the user-error contract; return its exit code."""
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        code = _resolve(command)(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error_message(err)
        if debug or message is None:
            raise
        sys.stderr.write(f"pmp-{command}: error: {message}\n")
        return 2
    return int(code or 0)


def main(argv: list[str] | None = None) -> None:
    """``python -m pmp_megatron <command> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        sys.stderr.write(f"usage: python -m pmp_megatron <command> [--debug] ...\ncommands: {names}\n")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.exit(run(argv[0], argv[1:]))


def _console(command: str) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(run(command, sys.argv[1:]))

    entry.__name__ = entry.__qualname__ = command.replace("-", "_") + "_main"
    entry.__doc__ = f"Console script pmp-{command}."
    return entry


# The console scripts (pyproject.toml). Named *_main: a bare ``release`` would be shadowed by the submodule
# ``cli.release`` as soon as it is imported.
pretrain_main = _console("pretrain")
export_mask_main = _console("export-mask")
release_main = _console("release")
attack_main = _console("attack")
launch_main = _console("launch")
quickstart_main = _console("quickstart")
dense_matched_main = _console("dense-matched")
preprocess_main = _console("preprocess")
eval_main = _console("eval")
import_hf_main = _console("import-hf")
