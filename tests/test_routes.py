"""``ckptforge routes``: top expert per patch/token, load histogram, PNG expert maps (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ckptforge.cli import main
from ckptforge.config import UpcycleOptions, router_settings
from ckptforge.execute import upcycle


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 40) * 255).astype("uint8")).save(path)
    return path


def _convert(dense, out, kind, **router):
    upcycle(dense, out, UpcycleOptions(num_experts=4, router=router_settings(kind, **router)))
    return out


@pytest.mark.parametrize(("kind", "router", "experts"), [
    ("topk", {}, 4), ("expert-choice", {}, 4), ("sphero", {"slots": 2}, 12), ("mh", {"heads": 2}, 4),
])
def test_routes_image_json_and_pngs(tiny, tmp_path, image, capsys, kind, router, experts):
    model = _convert(tiny("vit"), tmp_path / "moe", kind, **router)
    assert main(["routes", str(model), "--input", str(image), "--out", str(tmp_path / "map.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["router"] == kind and report["modality"] == "image" and report["grid"] == 4
    assert list(report["layers"]) == ["1", "3"]
    for routes in report["layers"].values():
        assert len(routes["top_expert"]) == 17 and len(routes["load"]) == experts
        assert all(-1 <= e < experts for e in routes["top_expert"])
        assert sum(routes["load"]) == sum(e >= 0 for e in routes["top_expert"])
        assert routes["dead_experts"] == [e for e, c in enumerate(routes["load"]) if c == 0]
    assert report["files"] == [str(tmp_path / "map-layer1.png"), str(tmp_path / "map-layer3.png")]
    assert all(Image.open(f).size[0] > 100 for f in report["files"])


def test_routes_text_table(tiny, tmp_path, capsys):
    from transformers import BertTokenizer

    dense = tiny("bert")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]) + "\n")
    model = _convert(dense, tmp_path / "moe", "topk")
    BertTokenizer(str(vocab)).save_pretrained(model)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat")
    assert main(["routes", str(model), "--input", str(text)]) == 0
    out = capsys.readouterr().out
    assert "layer 1" in out and "cat" in out and "dead experts" in out


def test_routes_bad_inputs(tiny, tmp_path, image, capsys):
    model = _convert(tiny("vit"), tmp_path / "moe", "topk")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["routes", str(model), "--input", str(text)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: '{text}' is not an image (.png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff); a ViT-MoE model routes image patches")
    assert main(["routes", str(model), "--input", str(tmp_path / "nope.png")]) == 3
    assert capsys.readouterr().err.strip() == f"error: input '{tmp_path / 'nope.png'}' does not exist; pass an image or a text file"
    bert = _convert(tiny("bert"), tmp_path / "bert-moe", "topk")
    assert main(["routes", str(bert), "--input", str(text)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: '{bert}' has no tokenizer files (tokenizer.json / tokenizer_config.json) and routing text needs the "
        "model's own tokenizer; copy the dense model's tokenizer files next to its config.json")
