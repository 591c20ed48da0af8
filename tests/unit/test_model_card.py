"""The release's model card: a README.md that huggingface_hub parses, with the license, architecture,
tokens seen, dtype note and the fine-tuning restriction, and nothing mask-derived (it is written from
public facts only, so the test plants recognisable values where a leak would show)."""

from __future__ import annotations

import pytest
import torch

from pmp_megatron.release.model_card import CARD_FILE, CardInfo
from pmp_megatron.release.writer import is_public_file, write_release
from pmp_megatron.testing import debug_config

INFO = CardInfo(name="pmp-debug", license="apache-2.0", dtype="float32", pmp=True, steps=1234,
                tokens=1234 * 32 * 64, num_parameters=987_654)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    from pmp_megatron.release.hf_llama import hf_shapes

    m = debug_config().model
    gen = torch.Generator().manual_seed(0)
    tensors = [(n, torch.randn(s, generator=gen)) for n, s in hf_shapes(m).items()]
    out = tmp_path_factory.mktemp("rel") / "release"
    return write_release(tensors, out, m, "float32", source={"checkpoint": "/owner/secret/run"}, card=INFO), m


def test_card_is_a_public_file_that_huggingface_hub_parses(release_dir):
    from huggingface_hub import ModelCard

    out, m = release_dir
    assert is_public_file(CARD_FILE) and (out / CARD_FILE).is_file()
    card = ModelCard.load(out / CARD_FILE)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert "non-fine-tunable" in card.data.tags
    text = card.text
    assert "# pmp-debug" in text and "restricted by design" in text
    assert f"{1234 * 32 * 64:,} training tokens" in text and "1,234 optimizer steps" in text
    assert f"{m.num_layers} layers, hidden size {m.hidden_size}" in text
    assert "float32, the precision they were trained and evaluated in" in text


def test_card_holds_no_owner_side_value(release_dir):
    out, _ = release_dir
    text = (out / CARD_FILE).read_text()
    for secret in ("/owner/secret/run", "rho", "density", "IoU", "W0", "w0_seed", "seed:"):
        assert secret not in text, secret


def test_dense_and_bf16_cards_say_so(tmp_path):
    from pmp_megatron.release.model_card import render

    m = debug_config().model
    text = render(CardInfo(name="d", license="other", dtype="bfloat16", pmp=False, steps=1, tokens=2,
                           num_parameters=3), m)
    assert "dense baseline" in text and "restricted by design" not in text
    assert "rounded from the float32 weights" in text
