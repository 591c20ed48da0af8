"""Stage II complement options on one process: ``complement=redraw`` (the draw on plain tensors, then the
rule on the debug model) and the size-free projection targets ``rms`` and ``shrink``, each checked
against a direct computation from the gathered weights and masks."""

import math

import pytest
import torch

from pmp_megatron.pmp import redraw
from pmp_megatron.pmp.masks import mask_of
from pmp_megatron.testing import spawn

SECRET = 0x9F3A_51C7_0E2D_B684_4C19_E7A0_3B5D_D2F1  # a 128-bit "secret" W0 seed, as the Trainer draws
LR = 1e-2
STEPS = 4
INTERVAL = 2


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between the empirical CDFs of ``a`` and ``b``."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


# ----------------------------------------------------------------------------- the draw on plain tensors

def test_redraw_keeps_trained_entries_and_matches_their_signed_values():
    gen = torch.Generator().manual_seed(0)
    trained = torch.rand(300, 200, generator=gen) < 0.5
    # trained entries heavy-tailed, the complement tiny (like a projected W0): easy to tell apart before
    heavy = torch.randn(300, 200, generator=gen) * torch.randn(300, 200, generator=gen).exp()
    values = torch.where(trained, heavy, 0.001 * torch.randn(300, 200, generator=gen))
    original = values.clone()
    assert _ks(values[~trained].abs(), values[trained].abs()) > 0.5  # the check below can fail
    num = redraw.redraw_(values, trained, ~trained, torch.Generator().manual_seed(1))
    assert num == int((~trained).sum())
    assert torch.equal(values[trained], original[trained])  # bit for bit
    comp = values[~trained]
    # n ~ 30,000 per side: the KS distance of two samples of one law stays below 0.016 with p 0.999
    assert _ks(comp, values[trained]) < 0.03  # signed values: the sign carries no signal either
    assert _ks(comp.abs(), values[trained].abs()) < 0.03
    assert torch.isin(comp, values[trained]).all()  # Q is the empirical quantile function


def test_redraw_keeps_the_sign_of_one_signed_tensor():
    """Trained norm weights sit near +1: a random sign would make every negative entry a complement entry."""
    gen = torch.Generator().manual_seed(0)
    trained = torch.rand(4096, generator=gen) < 0.5
    values = torch.where(trained, 1.0 + 0.05 * torch.randn(4096, generator=gen), torch.zeros(4096))
    redraw.redraw_(values, trained, ~trained, torch.Generator().manual_seed(3))
    assert (values > 0).all()


def test_redraw_is_a_function_of_its_generator():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, 40, generator=gen)
    trained = torch.rand(50, 40, generator=gen) < 0.3
    a, b, c = values.clone(), values.clone(), values.clone()
    redraw.redraw_(a, trained, ~trained, torch.Generator().manual_seed(5))
    redraw.redraw_(b, trained, ~trained, torch.Generator().manual_seed(5))
    redraw.redraw_(c, trained, ~trained, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a[~trained], c[~trained])


def test_draw_seed_is_keyed_by_secret_step_name_and_global_place():
    blocks = ((0, 0, 8),)
    base = redraw.draw_seed(SECRET, 4, "w", 0, blocks)
    assert base == redraw.draw_seed(SECRET, 4, "w", 0, blocks)
    others = [redraw.draw_seed(SECRET + 1, 4, "w", 0, blocks), redraw.draw_seed(SECRET, 6, "w", 0, blocks),
              redraw.draw_seed(SECRET, 4, "v", 0, blocks), redraw.draw_seed(SECRET, 4, "w", 0, ((0, 8, 8),)),
              redraw.draw_seed(SECRET, 4, "w", 1, blocks)]
    assert base not in others and len(set(others)) == len(others)
    assert redraw.draw_seed(SECRET, 4, "w", 0, ((3, 0, 8),)) == base  # only the global place counts
    assert 0 <= base < 2**63


def test_a_shard_without_trained_entries_or_complement_is_left_as_is():
    values = torch.randn(6, 5)
    for trained in (torch.zeros(6, 5, dtype=torch.bool), torch.ones(6, 5, dtype=torch.bool)):
        kept = values.clone()
        assert redraw.redraw_(kept, trained, ~trained, torch.Generator().manual_seed(0)) == 0
        assert torch.equal(kept, values)
    real = torch.ones(6, 5, dtype=torch.bool)
    real[4:] = False  # padded rows: neither trained nor complement
    trained = (torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) < 0.5) & real
    kept = values.clone()
    redraw.redraw_(kept, trained, ~trained & real, torch.Generator().manual_seed(0))
    assert torch.equal(kept[4:], values[4:])


# ----------------------------------------------------------------------------- the rule on the debug model

def _stage2(extra, steps, secret):
    """Stage II on the debug model (seed given in memory, as the Trainer does); per step the weights
    before and after ``after_step`` and its stats; then replays of the last step's complement policy."""
    from pmp_megatron import testing
    from pmp_megatron.model.gpt import build_model
    from pmp_megatron.model.params import shard_infos
    from pmp_megatron.pmp.update import MaskedUpdate
    from pmp_megatron.train.optimizer import build_optimizer, build_scheduler
    from pmp_megatron.train.step import train_step, wrap_ddp

    lines = testing.capture_log_messages()
    cfg = testing.init_debug_parallel([f"optim.lr={LR}", "optim.weight_decay=0.1", "pmp.mode=pmp",
                                       "pmp.rho=0.5", "optim.lr_decay_style=constant", "model.seed=null",
                                       *extra], 1)
    cfg.model.seed = secret  # what train.resume.resolve_seed does with a drawn secret seed
    chunks = build_model(cfg)
    infos = shard_infos(chunks, cfg.model.vocab_size)
    model = wrap_ddp(chunks, cfg)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, train_steps=steps)
    testing.attach_random_masks(chunks, cfg, density=0.5)
    refused = None
    if cfg.pmp.complement == "redraw":
        try:
            MaskedUpdate(chunks, opt, cfg, secret_seed=None)
        except ValueError as e:
            refused = str(e)

    def snap():
        return {n: p.detach().clone() for n, (p, _) in infos.items()}

    w0 = snap()
    rule = MaskedUpdate(chunks, opt, cfg, secret_seed=secret)
    before, after, stats = [], [], []
    for step in range(1, steps + 1):
        train_step(model, opt, testing.synthetic_batches(cfg, 2, 2, seed=step), cfg)
        sched.step(1)
        before.append(snap())
        stats.append(rule.after_step(step))
        after.append(snap())

    def replay(r, step):
        for n, (p, _) in infos.items():
            p.data.copy_(before[-1][n])
        r.after_step(step)
        return snap()

    out = dict(w0=w0, before=before, after=after, stats=stats, refused=refused, radius=rule.radius,
               masks={n: mask_of(p) for n, (p, _) in infos.items()},
               real={n: i.real(p.shape) for n, (p, i) in infos.items()},
               keys={n: (i.dim, i.blocks) for n, (_, i) in infos.items()})
    if cfg.pmp.complement == "redraw":
        out.update(same=replay(rule, steps), other_step=replay(rule, steps + INTERVAL),
                   other_secret=replay(MaskedUpdate(chunks, opt, cfg, secret_seed=secret + 1), steps))
    if cfg.pmp.projection:  # a resumed run builds its rule from trained weights
        out["resumed_radius"] = MaskedUpdate(chunks, opt, cfg, secret_seed=secret).radius
    out["lines"] = list(lines)
    return out


@pytest.fixture(scope="module")
def redrawn():
    return spawn(_stage2, 1, ["pmp.complement=redraw", f"pmp.redraw_interval={INTERVAL}"], STEPS, SECRET)[0]


def _complement(run, name):
    return ~run["masks"][name] & run["real"][name]


def test_redraw_happens_exactly_at_multiples_of_the_interval(redrawn):
    per_step = zip(redrawn["stats"], redrawn["before"], redrawn["after"], strict=True)
    for step, (stats, b, a) in enumerate(per_step, 1):
        assert ("redrawn_entries" in stats) == (step % INTERVAL == 0), step
        moved = any(not torch.equal(a[n], b[n]) for n in a)
        assert moved == (step % INTERVAL == 0), step
    num_complement = sum(int(_complement(redrawn, n).sum()) for n in redrawn["masks"])
    assert redrawn["stats"][INTERVAL - 1]["redrawn_entries"] == num_complement


def test_redraw_keeps_masked_in_entries_bit_identical(redrawn):
    for b, a in zip(redrawn["before"], redrawn["after"], strict=True):
        for name in redrawn["masks"]:
            outside = ~_complement(redrawn, name)  # masked-in entries and padded rows
            assert torch.equal(a[name][outside], b[name][outside]), name
            if a[name].dim() == 2 and not torch.equal(a[name], b[name]):
                comp = _complement(redrawn, name)
                assert (a[name][comp] != b[name][comp]).double().mean() > 0.9, name


def test_redrawn_magnitudes_follow_the_trained_entries(redrawn):
    checked = 0
    for step in range(INTERVAL, STEPS + 1, INTERVAL):
        weights = redrawn["after"][step - 1]
        for name, m in redrawn["masks"].items():
            comp, trained = _complement(redrawn, name), m & redrawn["real"][name]
            if min(int(comp.sum()), int(trained.sum())) < 4000:
                continue  # too few for a tight KS bound
            # >= 4,000 per side: one law gives a KS distance below 0.043 with p 0.999
            assert _ks(weights[name][comp], weights[name][trained]) < 0.05, (step, name)
            checked += 1
    assert checked >= 4


def test_redraw_depends_on_secret_and_step_only(redrawn):
    last = redrawn["after"][-1]
    for name in redrawn["masks"]:
        assert torch.equal(redrawn["same"][name], last[name]), name  # a resume redraws identically
    for other in ("other_step", "other_secret"):
        differs = [not torch.equal(redrawn[other][n], last[n]) for n in redrawn["masks"]]
        assert all(differs), other  # every tensor's draw changes (none is all-in or all-out here)
        for name, m in redrawn["masks"].items():
            assert torch.equal(redrawn[other][name][m], last[name][m])


def test_redraw_logs_no_seed(redrawn):
    text = "\n".join(redrawn["lines"])
    assert "complement redrawn" in text  # the capture saw the redraw's own line
    secrets = {str(SECRET), hex(SECRET)[2:], str(SECRET + 1)}
    for name, (dim, blocks) in redrawn["keys"].items():
        secrets |= {str(redraw.draw_seed(SECRET, s, name, dim, blocks)) for s in range(STEPS + INTERVAL + 1)}
    assert not [s for s in secrets if s in text]


def test_redraw_refuses_a_public_seed(redrawn):
    assert redrawn["refused"] is not None and "secret W0 seed" in redrawn["refused"]


def _complement_norm(run, weights):
    return math.sqrt(sum(weights[n][_complement(run, n)].double().pow(2).sum().item() for n in weights))


@pytest.mark.parametrize("target", ["rms", "shrink"])
def test_size_free_projection_targets(target):
    extra = ["pmp.projection=true", f"pmp.projection_target={target}", "pmp.projection_rms=1e-3",
             "pmp.projection_shrink=0.05", f"pmp.projection_interval={INTERVAL}"]
    run = spawn(_stage2, 1, extra, INTERVAL, 42)[0]
    if target == "rms":
        num = sum(int(_complement(run, n).sum()) for n in run["masks"])
        expected = 1e-3 * math.sqrt(num)
    else:
        expected = 0.05 * _complement_norm(run, run["w0"])
    assert run["radius"] == pytest.approx(expected, rel=1e-12)
    assert run["resumed_radius"] == run["radius"]  # from trained weights: the same R bit for bit
    stats = run["stats"][INTERVAL - 1]
    assert stats["projection_radius"] == run["radius"] and stats["complement_norm"] > expected
    assert stats["projected_norm"] == pytest.approx(expected, rel=1e-6)
    assert _complement_norm(run, run["after"][-1]) == pytest.approx(expected, rel=1e-6)
    assert any(f"projection radius R = {run['radius']:.6g}" in line for line in run["lines"])


def _trainer_setup(seed_override):
    """A redraw run's Trainer set up (no step taken): the error it raises, if any."""
    from pmp_megatron.testing import debug_config
    from pmp_megatron.train.trainer import Trainer

    cfg = debug_config(["pmp.mode=pmp", "pmp.rho=0.5", "pmp.complement=redraw", "pmp.redraw_interval=2",
                        "train.train_steps=4",
                        "train.eval_interval=0", *seed_override], 1)
    try:
        Trainer(cfg, batches=lambda split, consumed: iter(())).setup()
    except ValueError as err:
        return str(err)
    return None


def test_trainer_refuses_redraw_with_a_public_seed_before_any_step(tmp_path):
    """The check sits at the Trainer's start, not in Config.validate: a run's resolved config (in its
    checkpoint) holds the secret seed as model.seed, and its release must still load it. The message never
    shows a seed."""
    refused = spawn(_trainer_setup, 1, ["model.seed=123457"])[0]
    assert refused is not None and "secret W0 seed" in refused and "123457" not in refused
    seed_file = tmp_path / "seed"
    seed_file.write_text("98765432123456789\n")
    seed_file.chmod(0o600)
    assert spawn(_trainer_setup, 1, ["model.seed=null", f"model.seed_file={seed_file}"])[0] is None
    from pmp_megatron.testing import debug_config

    resolved = debug_config(["pmp.mode=pmp", "pmp.rho=0.5", "pmp.complement=redraw",
                             "model.seed=98765432123456789"], 1)
    assert resolved.pmp.complement == "redraw"  # what a checkpoint of a secret-seed redraw run holds: loads
