"""Release checkpoint conversion on synthetic state dicts with the release's names and shapes."""
import json
from pathlib import Path

import pytest
import torch

from divot import presets
from divot.convert import convert_release_tokenizer, load_release_tokenizer
from divot.tokenizer import DivotTokenizer

MANIFEST = json.loads((Path(__file__).parent / "data" / "divot_release_keys.json").read_text())["tokenizer"]


@pytest.fixture(scope="module")
def paper_tokenizer():
    return DivotTokenizer(presets.tokenizer_config("paper", vit={"depth": 1}))


def _release_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) for k, shape in MANIFEST.items()}


def test_release_tokenizer_converts_every_key(paper_tokenizer, tmp_path):
    release = _release_state()
    state, report = convert_release_tokenizer(release, paper_tokenizer)
    assert len(report.converted) == 206 and not report.unexpected and not report.shape_mismatch
    assert all(k.startswith("vit.") for k in report.missing)  # the file holds no ViT
    torch.save(release, tmp_path / "Divot_tokenizer.bin")
    load_release_tokenizer(str(tmp_path / "Divot_tokenizer.bin"), paper_tokenizer)
    own = paper_tokenizer.state_dict()
    assert torch.equal(own["image_proj_model.down_sampler.latents"], release["image_proj_model.down_sampler.latents"])


def test_release_tokenizer_reports_leftovers_and_mismatches(paper_tokenizer, tmp_path):
    release = _release_state()
    release["temporal_encoder.positional_embedding"] = torch.zeros(7, 768)
    release["something_else.weight"] = torch.zeros(3)
    _, report = convert_release_tokenizer(release, paper_tokenizer)
    assert report.unexpected == ["something_else.weight"]
    assert report.shape_mismatch and "positional_embedding" in report.shape_mismatch[0]
    assert not report.ok
    torch.save(release, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="does not fit"):
        load_release_tokenizer(str(tmp_path / "bad.bin"), paper_tokenizer)
