"""The adaptive key attackers on synthetic releases where we control which entries were trained.

A tiny Llama (2 layers, hidden 16, vocab 32) learns a fixed second-order Markov corpus it cannot memorize
(4k tokens), trained to near-stationarity (Adam, then L-BFGS) in two ways: only a random rho = 0.5 mask
(gradients of the complement zeroed, so it stays at the random init -- the ``frozen`` PMP complement), or
densely. The init std is 0.3 so that training barely separates the two by magnitude (|w| per tensor: IoU
~0.41). The gradient-stationarity attacker, given 8 batches of that corpus, recovers the mask with IoU
~0.49 (chance 0.333; its picks overlap |w|'s at chance, so it does not read magnitude) and scores the same
mask against the dense release at chance (~0.34).
Stage-I replication returns a mask of the asked density with the release's names, deterministic for a
fixed attacker seed. The audit runs both only when asked.
"""

import pytest
import torch

from pmp_megatron.release import adaptive_recovery, audit, reader, recovery

RHO = 0.5
VOCAB, SEQ, NUM_SEQS, NUM_BATCHES = 32, 16, 256, 8
INIT_STD = 0.3


def _corpus() -> torch.Tensor:
    """``[NUM_SEQS, SEQ]`` ids of a random second-order Markov chain (two successors per context)."""
    gen = torch.Generator().manual_seed(0)
    succ = torch.randint(0, VOCAB, (VOCAB, VOCAB, 2), generator=gen)
    x = torch.empty(NUM_SEQS, SEQ, dtype=torch.long)
    x[:, :2] = torch.randint(0, VOCAB, (NUM_SEQS, 2), generator=gen)
    for t in range(2, SEQ):
        x[:, t] = succ[x[:, t - 2], x[:, t - 1], torch.randint(0, 2, (NUM_SEQS,), generator=gen)]
    return x


def _train(masks: dict[str, torch.Tensor] | None, data: torch.Tensor, out) -> dict[str, torch.Tensor]:
    """Train the entries of ``masks`` (None: all) of a fresh tiny Llama on ``data`` to near-stationarity,
    save it as an HF directory ``out``; return the masks used."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      max_position_embeddings=SEQ, initializer_range=INIT_STD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg)
    if masks is None:
        masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        for n, p in model.named_parameters():
            p.grad.mul_(masks[n])  # the complement never moves
        return loss

    for _ in range(150):
        closure()
        opt.step()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=60, history_size=20, line_search_fn="strong_wolfe")
    opt.step(closure)
    model.save_pretrained(out)
    return masks


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """(PMP-like release dir, dense release dir, the true mask, the attacker's batches)."""
    from transformers import LlamaConfig

    data = _corpus()
    root = tmp_path_factory.mktemp("adaptive")
    gen = torch.Generator().manual_seed(2)
    shapes = _shapes(LlamaConfig)
    true = {n: torch.rand(s, generator=gen) < RHO for n, s in shapes.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend
    try:
        _train(true, data, root / "pmp")
        _train(None, data, root / "dense")
    finally:
        torch.set_num_threads(threads)
    return root / "pmp", root / "dense", true, list(data.split(NUM_SEQS // NUM_BATCHES))


def _shapes(config_cls) -> dict[str, tuple[int, ...]]:
    from transformers import LlamaForCausalLM

    cfg = config_cls(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                     max_position_embeddings=SEQ)
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).named_parameters()}


def test_gradient_stationarity_recovers_the_trained_entries(releases):
    pmp, _, true, batches = releases
    pred = adaptive_recovery.recover_gradient_stationarity(pmp, batches, rho=RHO, num_batches=NUM_BATCHES)
    chance = audit.chance_iou(RHO)
    assert recovery.mask_density(pred) == pytest.approx(RHO, abs=1e-4)
    found = recovery.iou(pred, true)
    assert found > chance + 0.08  # measured 0.49, chance 0.333
    weights, _ = reader.read_weights(pmp)
    assert found > recovery.iou(recovery.recover_per_tensor(weights, RHO), true)  # |w|: 0.41
    estimated = adaptive_recovery.recover_gradient_stationarity(pmp, batches, num_batches=NUM_BATCHES)
    assert 0.0 < recovery.mask_density(estimated) < 1.0  # Otsu's estimate when rho is not given


def test_gradient_stationarity_is_at_chance_on_a_dense_release(releases):
    _, dense, true, batches = releases
    pred = adaptive_recovery.recover_gradient_stationarity(dense, batches, rho=RHO, num_batches=NUM_BATCHES)
    assert abs(recovery.iou(pred, true) - audit.chance_iou(RHO)) < 0.04  # measured 0.337


def test_stage1_replication_density_names_and_seed(releases):
    pmp, _, true, batches = releases
    rng = torch.get_rng_state()
    first = adaptive_recovery.recover_stage1_replication(pmp, batches, rho=0.3, steps=3, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the attacker's init leaves the caller's RNG alone
    again = adaptive_recovery.recover_stage1_replication(pmp, batches, rho=0.3, steps=3, seed=5)
    other = adaptive_recovery.recover_stage1_replication(pmp, batches, rho=0.3, steps=3, seed=6)
    assert {n: tuple(m.shape) for n, m in first.items()} == {n: tuple(m.shape) for n, m in true.items()}
    total = sum(m.numel() for m in true.values())
    assert sum(int(m.sum()) for m in first.values()) == round(0.3 * total)  # exact global top-k
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    masks, info = adaptive_recovery.recover_adaptive("recovery_stage1", pmp, batches, density=0.3,
                                                     stage1_steps=3, seed=5)
    assert all(torch.equal(first[n], masks[n]) for n in first) and info["recovered_density"] == \
        pytest.approx(0.3, abs=1e-4)
    with pytest.raises(ValueError, match="not an adaptive recovery attacker"):
        adaptive_recovery.recover_adaptive("recovery_global", pmp, batches)


def test_topk_masks_takes_exactly_k_with_ties():
    scores = {"a": torch.tensor([0.0, 2.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 0.0], [3.0, 0.0]])}
    masks = adaptive_recovery.topk_masks(scores, 4)
    assert sum(int(m.sum()) for m in masks.values()) == 4
    assert masks["a"].tolist() == [False, True, True, True] and masks["b"].tolist() == [[False, False],
                                                                                        [True, False]]
    assert sum(int(m.sum()) for m in adaptive_recovery.topk_masks(scores, 7).values()) == 7  # zeros too


def test_estimate_density_ignores_zero_scores():
    gen = torch.Generator().manual_seed(0)
    low, high = torch.rand(4000, generator=gen) * 1e-3, 1.0 + torch.rand(2000, generator=gen)
    scores = {"x": torch.cat([torch.zeros(4000), low, high])}  # 40% zeros, 40% low, 20% high
    assert recovery.estimate_density(scores, ignore_zeros=True) == pytest.approx(0.2, abs=0.02)


def test_attacker_batches_use_the_release_tokenizer(tmp_path):
    import json

    from pmp_megatron.data import corpora
    from pmp_megatron.data.tokenizer import train_tokenizer

    tok = train_tokenizer(corpora.iter_documents("prose", max_docs=30, max_chars=2000),
                          tmp_path / "tokenizer.model", vocab_size=500)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32}))
    batches = adaptive_recovery.attacker_batches(tmp_path, num_batches=3, batch_size=2, seed=1)
    assert [tuple(b.shape) for b in batches] == [(2, 32)] * 3
    assert int(torch.cat(batches).max()) < tok.vocab_size
    again = adaptive_recovery.attacker_batches(tmp_path, num_batches=3, batch_size=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_audit_runs_the_adaptive_attackers_only_when_asked(releases, tmp_path):
    from pmp_megatron.pmp import maskfile

    pmp, _, true, batches = releases
    key = tmp_path / "key.safetensors"
    maskfile.save(true, key, rho=RHO)
    plain = audit.audit_release(pmp, key, seed_guesses=10)
    assert not plain["adaptive"] and not set(adaptive_recovery.ADAPTIVE_ATTACKERS) & set(plain["attackers"])
    opts = adaptive_recovery.AdaptiveAudit(num_batches=NUM_BATCHES, stage1_steps=2, batches=tuple(batches))
    report = audit.audit_release(pmp, key, seed_guesses=10, adaptive=opts)
    assert report["adaptive"]
    gradient = report["attackers"]["recovery_gradient"]
    assert gradient["iou"]["overall"] > report["chance_iou"] + 0.08 and gradient["num_batches"] == NUM_BATCHES
    stage1 = report["attackers"]["recovery_stage1"]
    assert stage1["recovered_density"] == pytest.approx(report["mask_density"], abs=1e-4)
    assert "recovery_gradient" in audit.markdown_table(report)
    with pytest.raises(ValueError, match="unknown adaptive attacker"):
        adaptive_recovery.AdaptiveAudit(attackers=("recovery_magic",))


def test_the_suite_knows_the_adaptive_attackers_by_the_same_names():
    from pmp_megatron.attack import suite

    assert suite.ADAPTIVE_ATTACKERS == adaptive_recovery.ADAPTIVE_ATTACKERS
    assert set(suite.ADAPTIVE_ATTACKERS) <= set(suite.RECOVERY_ATTACKERS) - set(suite.DEFAULT_ATTACKERS)
