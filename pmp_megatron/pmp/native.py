"""The CPU kernel of the gradient mask (``csrc/masked_mul.c``), compiled on first use and cached.

Eager torch needs two passes and a temporary for ``grad *= unpacked bits`` (unpack, then a mixed-dtype
multiply): 34 ms for a 25M-entry share on one core, measured, where an in-place scale takes 8 ms; this
kernel is one pass, 9 ms. It is plain C (no Python or torch headers), built with the system C compiler
(``$CC``, else ``cc``/``gcc``) in well under a second into a cache directory (``$PMP_NATIVE_CACHE``, else
``$XDG_CACHE_HOME/pmp_megatron/native``, else ``~/.cache/pmp_megatron/native``), one file per source
hash, compiler and machine; the write is atomic, so ranks starting together may each build it and any of
them wins. Loaded with ctypes, which releases the GIL during the call: with several torch threads
(``torch.get_num_threads``) a large range is cut into one piece per thread.

If there is no compiler or the build fails (one warning), or ``PMP_NATIVE=0``, ``masked_mul_`` returns
False and the caller uses eager torch: the same product, bit for bit, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "masked_mul.c"
_FLAGS = ("-O3", "-shared", "-fPIC")
_SIGNATURE = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
_PARALLEL_MIN = 1 << 22  # entries below which one thread does the range


def cache_dir() -> Path:
    if os.environ.get("PMP_NATIVE_CACHE"):
        return Path(os.environ["PMP_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pmp_megatron" / "native"


def _build(cc: str) -> Path:
    """The shared library for this source, compiler and machine: from the cache, or built into it."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = cache_dir() / f"masked_mul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True)
        if proc.returncode:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
            raise RuntimeError(f"{cc} failed on {_SOURCE.name}: {lines[0]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (and one warning) where it cannot be built."""
    if os.environ.get("PMP_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if not cc:
            raise RuntimeError("no C compiler (set CC, or install gcc)")
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError) as err:
        logger.warning("the CPU gradient-mask kernel is not available (%s): eager torch masks instead "
                       "(the same result, slower)", err)
        return None
    for name in ("pmp_masked_mul_f32", "pmp_masked_mul_f32_table"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _SIGNATURE, ctypes.c_int
    return lib


def masked_mul_(grad: torch.Tensor, packed: torch.Tensor, start: int, table: bool = False) -> bool:
    """``grad *= bits [start, start + grad.numel())`` of ``packed`` in place, for a contiguous fp32 CPU
    ``grad``, as ``grad.mul_(bitmask.unpack_bits(packed, start, grad.numel()))`` does; False (nothing
    done) for any other tensor or without the kernel. ``table``: skip AVX2 (tests)."""
    lib = library()
    if (lib is None or grad.device.type != "cpu" or grad.dtype != torch.float32 or not grad.is_contiguous()
            or packed.device.type != "cpu" or packed.dtype != torch.uint8 or not packed.is_contiguous()):
        return False
    assert 0 <= start and start + grad.numel() <= 8 * packed.numel(), (start, grad.numel(), packed.numel())
    fn = lib.pmp_masked_mul_f32_table if table else lib.pmp_masked_mul_f32
    n, threads = grad.numel(), torch.get_num_threads()
    if threads == 1 or n < _PARALLEL_MIN:
        fn(grad.data_ptr(), packed.data_ptr(), start, n)
        return True
    # torch's intra-op threads: one piece each (ctypes releases the GIL; the pieces share no entry)
    size, bytes_per = math.ceil(n / threads), grad.element_size()
    pieces = [(grad.data_ptr() + lo * bytes_per, packed.data_ptr(), start + lo, min(size, n - lo))
              for lo in range(0, n, size)]
    list(_pool(threads).map(lambda args: fn(*args), pieces))
    return True



@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="pmp-mask")
