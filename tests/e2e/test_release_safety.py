"""`pmp-release` keeps the owner's secrets out of a release and never destroys them: on tiny single-process
checkpoints (the debug model at W0, one PMP with random masks and a secret 128-bit W0 seed, one dense),
the release directory holds public files only (the manifest and audit go to ``<out>.owner/``, mode 0700,
with no seed), an ``--out`` that is, contains or lies inside the checkpoint -- or holds a key file -- is
refused with nothing deleted, a dense checkpoint with ``--mask`` and the key of another run are refused,
the key carries the checkpoint's seed, which the audit uses, and an HF import without a seed gets a
secret one kept out of its config.yaml."""

import json
import secrets
import stat
from pathlib import Path

import pytest

from pmp_megatron.testing import spawn

pytestmark = pytest.mark.e2e

SECRET = secrets.randbits(128) | (1 << 127)


def _save_checkpoint(root: str, mode: str, seed: int, secret: bool) -> None:
    """One process: the debug model at W0 of ``seed`` (random masks in PMP mode), saved as iteration 1."""
    from pmp_megatron.config import config_to_dict
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.testing import attach_random_masks, init_debug_parallel
    from pmp_megatron.train import checkpoint

    cfg = init_debug_parallel([f"pmp.mode={mode}", *(["pmp.rho=0.5"] if mode == "pmp" else [])])
    cfg.model.seed = seed  # in memory, as the trainer does with a drawn secret seed
    chunks = build_model(cfg)
    if mode == "pmp":
        attach_random_masks(chunks, cfg, density=0.5)
    common = {"config": config_to_dict(cfg), "pmp_mode": mode, "w0_seed_secret": secret,
              "consumed_samples": 0, "scheduler": {}}
    checkpoint.save(root, 1, chunks, None, cfg, common)


def _call(fn_name: str, *args, **kwargs):
    """One process: ``release.<module>.<fn>(*args, **kwargs)``; a ValueError comes back as its message."""
    import importlib

    module, fn = fn_name.rsplit(".", 1)
    try:
        out = getattr(importlib.import_module(f"pmp_megatron.release.{module}"), fn)(*args, **kwargs)
    except ValueError as err:
        return f"ValueError: {err}"
    return str(out)


def _spawn_kwargs(fn_name, args, kwargs):
    return spawn(_call_kw, 1, fn_name, args, kwargs)[0]


def _call_kw(fn_name, args, kwargs):
    return _call(fn_name, *args, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    owner = tmp_path_factory.mktemp("owner")
    out = {"owner": owner, "pmp": owner / "ckpt", "dense": owner / "dense"}
    spawn(_save_checkpoint, 1, str(out["pmp"]), "pmp", SECRET, True)
    spawn(_save_checkpoint, 1, str(out["dense"]), "dense", 42, False)
    out["key"] = owner / "private" / "key.safetensors"
    assert _spawn_kwargs("key_export.export_mask", (str(out["pmp"]), str(out["key"])), {}) != ""
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_key_holds_the_checkpoints_secret_seed(runs):
    from pmp_megatron.pmp import maskfile

    _, meta = maskfile.load(runs["key"])
    assert meta["w0_seed"] == SECRET and meta["format"] == "pmp-mask-v2"
    assert stat.S_IMODE(runs["key"].stat().st_mode) == 0o600


def test_release_holds_public_files_only_and_the_owner_dir_the_rest(runs, tmp_path):
    from pmp_megatron.release.writer import is_public_file

    out = tmp_path / "pub" / "release"
    result = _spawn_kwargs("from_checkpoint.release", (str(runs["pmp"]), str(out)),
                           {"mask": str(runs["key"]), "tokenizer_model": None})
    assert not result.startswith("ValueError"), result
    names = sorted(p.name for p in out.iterdir())
    assert all(is_public_file(n) for n in names) and "model.safetensors" in names, names
    owner = tmp_path / "pub" / "release.owner"
    assert stat.S_IMODE(owner.stat().st_mode) == 0o700
    assert sorted(p.name for p in owner.iterdir()) == ["release_audit.json", "release_manifest.json"]
    public = "".join(p.read_text(errors="replace") for p in out.iterdir())
    for secret in (str(SECRET), hex(SECRET)[2:], str(runs["pmp"].resolve()), "pmp_mode", "rho"):
        assert secret not in public, secret
    owner_text = "".join(p.read_text() for p in owner.iterdir())
    assert str(SECRET) not in owner_text and hex(SECRET)[2:] not in owner_text
    report = json.loads((owner / "release_audit.json").read_text())
    # The init attacker regenerated this release's W0 exactly from the key's secret seed (the weights are W0:
    # every tensor's ratio cluster is at 1); seed guessing finds nothing.
    init = report["attackers"]["recovery_init"]
    assert report["init_seed_known"] and init["num_unfit_tensors"] == 0 and init["scale_median"] == 1.0
    assert not report["attackers"]["recovery_seed_guess"]["seed_found"]
    manifest = json.loads((owner / "release_manifest.json").read_text())
    assert manifest["source"]["pmp_mode"] == "pmp" and manifest["source"]["w0_seed_secret"] is True


@pytest.mark.parametrize("where", ["checkpoint", "parent", "inside"])
def test_out_over_the_checkpoint_is_refused_and_nothing_deleted(runs, where):
    """``pmp-release --checkpoint owner/ckpt --out owner --overwrite`` used to delete the checkpoint and
    the private key beside it, exit 0."""
    before = _tree(runs["owner"])
    out = {"checkpoint": runs["pmp"], "parent": runs["owner"], "inside": runs["pmp"] / "release"}[where]
    result = _spawn_kwargs("from_checkpoint.release", (str(runs["pmp"]), str(out)),
                           {"overwrite": True, "tokenizer_model": None})
    assert result.startswith("ValueError: release output") and "checkpoint directory" in result, result
    assert _tree(runs["owner"]) == before


def test_out_holding_a_key_file_is_refused(runs, tmp_path):
    from pmp_megatron.pmp import maskfile

    out = tmp_path / "keys"
    key = out / "nested" / "k.safetensors"
    masks, meta = maskfile.load(runs["key"])
    maskfile.save(masks, key, rho=meta["rho"], w0_seed=meta["w0_seed"])
    result = _spawn_kwargs("from_checkpoint.release", (str(runs["dense"]), str(out)),
                           {"overwrite": True, "tokenizer_model": None})
    assert result.startswith("ValueError") and "private key file" in result and str(key) in result
    assert maskfile.load(key)[1]["w0_seed"] == SECRET


def test_dense_checkpoint_or_another_runs_key_with_mask_is_refused(runs, tmp_path):
    from pmp_megatron.pmp import maskfile

    result = _spawn_kwargs("from_checkpoint.release", (str(runs["dense"]), str(tmp_path / "d")),
                           {"mask": str(runs["key"]), "tokenizer_model": None})
    assert result.startswith("ValueError") and "is a dense run" in result, result
    masks, meta = maskfile.load(runs["key"])
    other = tmp_path / "other.safetensors"
    maskfile.save(masks, other, rho=meta["rho"], w0_seed=SECRET + 1)
    result = _spawn_kwargs("from_checkpoint.release", (str(runs["pmp"]), str(tmp_path / "p")),
                           {"mask": str(other), "tokenizer_model": None})
    assert result.startswith("ValueError") and "key of another run" in result, result
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()


def _common(root: str) -> dict:
    from pmp_megatron import mcore
    from pmp_megatron.train import checkpoint

    mcore.init_distributed()
    return checkpoint.read_common(root, checkpoint.latest_valid(root))


def test_hf_import_gets_a_secret_seed_kept_out_of_config_yaml(runs, tmp_path):
    """to_megatron without a seed draws a secret one, like the Trainer: in the common state only."""
    release = tmp_path / "dense_release"
    assert not _spawn_kwargs("from_checkpoint.release", (str(runs["dense"]), str(release)),
                             {"tokenizer_model": None}).startswith("ValueError")
    back = tmp_path / "imported"
    result = _spawn_kwargs("to_megatron.to_megatron", (str(release), str(back)), {})
    assert not result.startswith("ValueError"), result
    common = spawn(_common, 1, str(back))[0]
    seed = common["config"]["model"]["seed"]
    assert common["w0_seed_secret"] is True and isinstance(seed, int) and seed >= 0
    saved = (back / "config.yaml").read_text()
    assert "seed: null" in saved and str(seed) not in saved
    again = tmp_path / "again"
    assert not _spawn_kwargs("from_checkpoint.release", (str(back), str(again)),
                             {"tokenizer_model": None}).startswith("ValueError")
    assert (again / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()
