"""The offline evaluation tasks of attack evaluation v2: synthetic copy / reverse / recall over random ids,
and stdlib-family classification by LM. Determinism, disjoint splits, LM-format samples, and the scorers
against an oracle model and against a slow per-example reference on a tiny random Llama."""

from types import SimpleNamespace

import pytest
import torch

from pmp_megatron.attack import classify
from pmp_megatron.data import synthetic
from pmp_megatron.data.synthetic import Example, SyntheticTask


def _tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


class Oracle(torch.nn.Module):
    """An HF-like causal LM that predicts the next token from a table of prefixes (else id 0)."""

    def __init__(self, vocab_size: int, table: dict[tuple[int, ...], int]):
        super().__init__()
        self.vocab_size, self.table = vocab_size, table

    def forward(self, input_ids, logits_to_keep=0):
        b, s = input_ids.shape
        if isinstance(logits_to_keep, int):
            positions = list(range(s - logits_to_keep if logits_to_keep else 0, s))
        else:
            positions = logits_to_keep.tolist()
        logits = torch.zeros(b, len(positions), self.vocab_size)
        for r in range(b):
            row = input_ids[r].tolist()
            for j, p in enumerate(positions):
                logits[r, j, self.table.get(tuple(row[: p + 1]), 0)] = 1.0
        return SimpleNamespace(logits=logits)


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_synthetic_is_deterministic_and_its_splits_are_disjoint(name):
    task = SyntheticTask(name, vocab_size=300, length=4)
    train = synthetic.generate(task, "train", 400, seed=0)
    assert train == synthetic.generate(task, "train", 400, seed=0)
    assert train != synthetic.generate(task, "train", 400, seed=1)
    prompts = {e.prompt for e in train}
    assert len(prompts) == 400
    for seed in (0, 1, 2):  # no seed puts an eval prompt into train
        evals = synthetic.generate(task, "eval", 100, seed=seed)
        assert not prompts & {e.prompt for e in evals}
        assert all(synthetic.split_of(e.prompt, task.eval_percent) == "eval" for e in evals)
    assert all(synthetic.split_of(e.prompt, task.eval_percent) == "train" for e in train)
    e = train[0]
    assert (len(e.prompt), len(e.target)) == (task.prompt_length, task.target_length)
    assert e.prompt[0] == task.markers[name] and task.markers["sep"] in e.prompt


def test_synthetic_formats_and_vocabulary_coverage():
    task = SyntheticTask("copy", vocab_size=64, length=6, special_ids=(0, 1, 2))
    train = synthetic.generate(task, "train", 300)
    used = {t for e in train for t in e.prompt[1:-1]}
    assert used == set(task.content_ids) == set(range(7, 64))  # every content row, no special, no marker
    x = train[0].prompt[1:-1]
    assert train[0].target == x
    rev = synthetic.generate(SyntheticTask("reverse", 64, 6), "train", 1)[0]
    assert rev.target == rev.prompt[1:-1][::-1]
    rec = synthetic.generate(SyntheticTask("recall", 64, 5), "eval", 20)
    for e in rec:
        keys, values = e.prompt[1:11:2], e.prompt[2:11:2]
        assert len(set(keys)) == 5 and e.prompt[-2] in keys
        assert e.target == (values[keys.index(e.prompt[-2])],)
    with pytest.raises(ValueError, match="found only"):
        synthetic.generate(SyntheticTask("copy", vocab_size=9, length=1), "train", 50)
    with pytest.raises(ValueError, match="unknown synthetic task 'sort'"):
        SyntheticTask("sort", 64)


def test_synthetic_lm_samples_mask_the_target_and_train():
    examples = synthetic.generate(SyntheticTask("recall", 64, 3), "train", 4) + synthetic.generate(
        SyntheticTask("copy", 64, 2), "train", 2)
    tokens, mask = synthetic.lm_samples(examples, pad_id=0)
    assert tokens.shape == mask.shape == (6, 11)
    for i, e in enumerate(examples):
        p, t = len(e.prompt), len(e.target)
        assert tokens[i, : p + t].tolist() == list(e.prompt + e.target)
        assert mask[i].nonzero().flatten().tolist() == list(range(p, p + t))
    labels = synthetic.hf_labels(tokens, mask)
    assert (labels[mask] == tokens[mask]).all() and (labels[~mask] == -100).all()
    model = _tiny_llama(64).train()
    loss = model(input_ids=tokens, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad is not None


def test_exact_match_against_an_oracle_and_a_per_example_reference():
    task = SyntheticTask("reverse", vocab_size=64, length=3)
    recall = SyntheticTask("recall", 64, 2)
    examples = synthetic.generate(task, "eval", 10) + synthetic.generate(recall, "eval", 6)
    table = {}
    for i, e in enumerate(examples):
        seq = e.prompt + e.target
        for j in range(len(e.prompt), len(seq)):
            wrong = i % 4 == 0 and j == len(seq) - 1  # every 4th example misses its last target token
            table[seq[:j]] = (seq[j] + 1) % 64 if wrong else seq[j]
    assert synthetic.exact_match(Oracle(64, table), examples, "cpu", batch_size=3) == 12 / 16
    model = _tiny_llama(64)
    with torch.no_grad():
        ref = sum(
            bool((model(input_ids=torch.tensor([e.prompt + e.target[:-1]])).logits[0, len(e.prompt) - 1:]
                  .argmax(-1) == torch.tensor(e.target)).all()) for e in examples) / len(examples)
    assert synthetic.exact_match(model, examples, "cpu", batch_size=5) == ref
    assert synthetic.exact_match(model, examples, "cpu", batch_size=1) == ref


# ----------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def classify_splits():
    return classify.examples("train", max_per_family=None), classify.examples("eval")


def test_classify_is_deterministic_balanced_and_split_by_document(classify_splits):
    train, evals = classify_splits
    assert evals == classify.examples("eval")
    assert len(evals) >= 200 and len(evals) == 50 * len(classify.FAMILIES)
    assert {e.label for e in evals} == set(range(len(classify.FAMILIES)))
    assert not {e.source for e in train} & {e.source for e in evals}  # held-out DOCUMENTS
    assert not {e.text for e in train} & {e.text for e in evals}
    for e in train[::97] + evals[::17]:
        assert e.source.startswith(f"test/test_{classify.FAMILIES[e.label]}/")
        lowered = e.text.lower()
        assert not any(f.removesuffix("3") in lowered for f in classify.FAMILIES), e.text
        assert 160 <= len(e.text) <= 400


def test_classify_lm_samples_and_accuracy_against_an_oracle_and_a_reference(classify_splits):
    _, evals = classify_splits
    items = evals[::15]  # 20 examples, every family

    def encode(text):  # a stand-in tokenizer: one id per character, ids 10..73
        return [10 + ord(c) % 64 for c in text]

    label_ids = [3, 4, 5, 6, 7, 8]
    encoded = classify.encode_examples(items, encode, max_tokens=48)
    suffix = encode(classify.SUFFIX)
    assert all(len(ids) <= 48 and ids[-len(suffix):] == suffix for ids, _ in encoded)
    tokens, mask = classify.lm_samples(encoded, label_ids)
    for i, (ids, label) in enumerate(encoded):
        assert mask[i].nonzero().flatten().tolist() == [len(ids)] and tokens[i, len(ids)] == label_ids[label]
    table = {tuple(ids): label_ids[label] if i % 5 else label_ids[(label + 1) % 6]
             for i, (ids, label) in enumerate(encoded)}
    assert classify.accuracy(Oracle(80, table), encoded, label_ids, "cpu", batch_size=6) == 16 / 20
    ragged = [(ids[: 20 + 3 * i], label) for i, (ids, label) in enumerate(encoded)]  # varied lengths
    model = _tiny_llama(80)
    with torch.no_grad():
        ref = sum(int(model(input_ids=torch.tensor([ids])).logits[0, -1, label_ids].argmax()) == label
                  for ids, label in ragged) / len(ragged)
    assert classify.accuracy(model, ragged, label_ids, "cpu", batch_size=7) == ref
    assert classify.accuracy(model, ragged, label_ids, "cpu", batch_size=1) == ref
    assert classify.label_token_ids(lambda t: [ord(t[1])], ["asyncio", "email"]) == [ord("a"), ord("e")]
    with pytest.raises(ValueError, match="not distinct"):
        classify.label_token_ids(lambda t: [1], ["asyncio", "email"])


def test_example_is_hashable_and_frozen():
    e = Example((1, 2), (3,))
    assert {e: 1}[Example((1, 2), (3,))] == 1
