"""Built-in offline corpora: English prose and Python source taken from the Python installation itself.

No network and no downloads: every document comes from the standard library of the running Python, so
a corpus is the same on every machine with the same Python version (the contents change with the
version; ``corpus_fingerprint`` names what was read). Everything is sorted, so the same call gives the
same documents in the same order on every run.

Domains (use them in a config as ``builtin:<domain>``), in priority order:

* ``prose`` (pretraining): module docstrings of the non-test standard-library modules, then the pydoc
  documentation topics (``pydoc_data.topics``) whose key falls in the training part of a fixed sha256
  split (about 60 %).
* ``code`` (pretraining): the non-test standard-library ``.py`` files, except ``pydoc_data/topics.py``
  (it holds the pydoc topics verbatim, held-out ones included).
* ``prose_heldout`` (downstream): the remaining pydoc documentation topics.
* ``code_test`` (downstream): the standard library's test sources (``test/`` and other test folders).

Domains never share a document: a document equal to one of an earlier domain (in the order above,
compared both whole and cut at the same ``max_chars``) is dropped, and so is a repeat inside a domain.
Documents shorter than ``MIN_CHARS`` non-blank characters are dropped. ``site-packages`` is never read.

``iter_source`` reads any document source the pipeline accepts: ``builtin:<domain>``, a JSONL file
(``.jsonl``/``.json``, one object a line, the text under a configurable key), or a plain text file
(one document per file, or one per blank-line-separated paragraph with ``split_paragraphs``). Input files
must be UTF-8: a byte that is not raises one ValueError naming the file and line.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

PRETRAINING_DOMAINS = ("prose", "code")
DOWNSTREAM_DOMAINS = ("prose_heldout", "code_test")
DOMAINS = PRETRAINING_DOMAINS + DOWNSTREAM_DOMAINS  # priority order for disjointness
BUILTIN_PREFIX = "builtin:"
MIN_CHARS = 64  # documents with fewer non-blank characters are dropped
HELDOUT_TOPIC_PERCENT = 40  # share of pydoc topics (by key hash) kept out of `prose`

_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SKIP_FILES = {"pydoc_data/topics.py"}  # the pydoc topics as a literal: would leak `prose_heldout`


def list_domains() -> list[str]:
    """Names of the built-in domains, in priority order (pretraining first, then downstream)."""
    return list(DOMAINS)


def parse_builtin(name: str) -> str | None:
    """``"builtin:code"`` -> ``"code"``; ``None`` for anything that is not a builtin name.

    Raises ValueError for a ``builtin:`` name whose domain does not exist.
    """
    if not name.startswith(BUILTIN_PREFIX):
        return None
    domain = name[len(BUILTIN_PREFIX):]
    _check_domain(domain)
    return domain


def iter_documents(domain: str, max_docs: int | None = None, max_chars: int | None = None) -> Iterator[str]:
    """Yield the documents of ``domain`` in their fixed order.

    ``max_docs`` caps the number of documents, ``max_chars`` cuts every document to its first
    ``max_chars`` characters (before the duplicate and minimum-length checks).
    """
    _check_domain(domain)
    if max_docs is not None and max_docs < 0:
        raise ValueError(f"max_docs must be >= 0, got {max_docs}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if max_docs == 0:
        return
    excluded = _earlier_hashes(domain, max_chars)
    seen: set[bytes] = set()
    for text in _raw_documents(domain):
        if max_chars is not None:
            text = text[:max_chars]
        if len("".join(text.split())) < MIN_CHARS:
            continue
        digest = document_hash(text)
        if digest in seen or digest in excluded:
            continue
        seen.add(digest)
        yield text
        if max_docs is not None and len(seen) >= max_docs:
            return


def write_jsonl(domain: str, path: str | os.PathLike, max_docs: int | None = None,
                max_chars: int | None = None) -> int:
    """Write the documents of ``domain`` as JSONL (one ``{"text": ...}`` object a line); return the count."""
    num_docs = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in iter_documents(domain, max_docs=max_docs, max_chars=max_chars):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            num_docs += 1
    return num_docs


def iter_source(source: str | os.PathLike, json_key: str = "text", split_paragraphs: bool = False,
                max_docs: int | None = None, max_chars: int | None = None) -> Iterator[str]:
    """Yield the documents of one source: ``builtin:<domain>``, a JSONL file or a plain text file.

    ``max_docs`` caps the documents taken from the source and ``max_chars`` cuts each one. Empty
    documents (blank JSONL texts, blank paragraphs, empty files) are skipped.
    """
    source = str(source)
    domain = parse_builtin(source)
    if domain is not None:
        yield from iter_documents(domain, max_docs=max_docs, max_chars=max_chars)
        return
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"input file {source} does not exist (or is not a file)")
    if path.suffix in (".jsonl", ".json"):
        docs = _iter_jsonl(path, json_key)
    elif split_paragraphs:
        docs = _iter_paragraphs(path)
    else:
        docs = iter([_read_text(path)])
    num_docs = 0
    for text in docs if max_docs != 0 else ():
        if max_chars is not None:
            text = text[:max_chars]
        if text.strip():
            yield text
            num_docs += 1
            if max_docs is not None and num_docs >= max_docs:
                return


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a non-UTF-8 byte
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_utf8(text: str, path: Path, line_no: int) -> str:
    """``text`` (one line, decoded with ``surrogateescape``), or ValueError naming the first bad byte."""
    bad = _UNDECODABLE.search(text)
    if bad is not None:
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xdc00:02x} at "
                         f"column {bad.start() + 1}); convert the file to UTF-8")
    return text


def _read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    bad = _UNDECODABLE.search(text)
    if bad is not None:
        line_start = text.rfind("\n", 0, bad.start()) + 1
        _check_utf8(text[line_start:bad.end()], path, text.count("\n", 0, bad.start()) + 1)
    return text


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, one at a time; ValueError at the first bad byte."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            yield line_no, _check_utf8(line, path, line_no)


def _iter_jsonl(path: Path, json_key: str) -> Iterator[str]:
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or json_key not in record:
            raise ValueError(f"{path}:{line_no}: no {json_key!r} key in this JSONL line")
        text = record[json_key]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_no}: {json_key!r} is a {type(text).__name__}, not a string")
        if _SURROGATE.search(text):
            raise ValueError(f"{path}:{line_no}: {json_key!r} holds a lone surrogate escape "
                             "(\\ud800-\\udfff), which is not text")
        yield text


def _iter_paragraphs(path: Path) -> Iterator[str]:
    paragraph: list[str] = []
    for _, line in _text_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\n")


def document_hash(text: str) -> bytes:
    """sha256 of a document's UTF-8 bytes (the identity used for de-duplication)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def corpus_fingerprint() -> dict:
    """What the built-in corpora were read from: the Python version and the standard-library path."""
    return {"python": sys.version.split()[0], "stdlib": str(_stdlib_root())}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown builtin domain {domain!r}; known domains: {', '.join(DOMAINS)}")


def _raw_documents(domain: str) -> Iterator[str]:
    """The candidate documents of a domain, before cutting, de-duplication and exclusion."""
    if domain == "prose":
        for _, path in _stdlib_files(test=False):
            doc = _module_docstring(_read_source(path))
            if doc is not None:
                yield doc
        for key in _topic_keys(heldout=False):
            yield _topics()[key]
    elif domain == "code":
        for _, path in _stdlib_files(test=False):
            yield _read_source(path)
    elif domain == "prose_heldout":
        for key in _topic_keys(heldout=True):
            yield _topics()[key]
    elif domain == "code_test":
        for _, path in _stdlib_files(test=True):
            yield _read_source(path)
    else:
        raise AssertionError(domain)


@functools.lru_cache(maxsize=16)
def _earlier_hashes(domain: str, max_chars: int | None) -> frozenset[bytes]:
    """Hashes (whole and cut at ``max_chars``) of every candidate document of the earlier domains."""
    hashes: set[bytes] = set()
    for earlier in DOMAINS[: DOMAINS.index(domain)]:
        for text in _raw_list(earlier):
            hashes.add(document_hash(text))
            if max_chars is not None:
                hashes.add(document_hash(text[:max_chars]))
    return frozenset(hashes)


@functools.lru_cache(maxsize=len(DOMAINS))
def _raw_list(domain: str) -> tuple[str, ...]:
    return tuple(_raw_documents(domain))


@functools.lru_cache(maxsize=1)
def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _is_test_path(rel: tuple[str, ...]) -> bool:
    dirs, name = rel[:-1], rel[-1]
    return name.startswith("test_") or any(d in _TEST_DIRS or d.endswith("_test") for d in dirs)


@functools.lru_cache(maxsize=2)
def _stdlib_files(test: bool) -> tuple[tuple[str, Path], ...]:
    """Sorted (relative posix path, path) of the stdlib ``.py`` files that are (or are not) tests."""
    root = _stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                rel = (*rel_dir, name)
                if "/".join(rel) not in _SKIP_FILES and _is_test_path(rel) == test:
                    found.append(("/".join(rel), Path(dirpath, name)))
    return tuple(sorted(found))


def _read_source(path: Path) -> str:
    """A source file as text: its declared encoding (utf-8 by default), bad bytes replaced, ``\\n`` ends."""
    raw = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding, errors="replace")
    except (SyntaxError, LookupError):
        text = raw.decode("utf-8", errors="replace")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return _clean(text)


def _clean(text: str) -> str:
    """Replace lone surrogates (from escapes in docstrings) so every document is valid UTF-8."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _module_docstring(source: str) -> str | None:
    """The module docstring of ``source`` without importing or fully parsing it (tokenize the head)."""
    strings = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.STRING:
                strings.append(tok.string)
            elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER) and strings:
                break
            elif tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
                return None  # the first statement is not a bare string literal
        value = ast.literal_eval(" ".join(strings)) if strings else None
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    if not isinstance(value, str):
        return None
    return _clean(inspect.cleandoc(value))


@functools.lru_cache(maxsize=1)
def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {key: _clean(value.replace("\r\n", "\n")) for key, value in topics.items()}


@functools.lru_cache(maxsize=2)
def _topic_keys(heldout: bool) -> tuple[str, ...]:
    def is_heldout(key: str) -> bool:
        return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < HELDOUT_TOPIC_PERCENT

    return tuple(k for k in sorted(_topics()) if is_heldout(k) == heldout)
