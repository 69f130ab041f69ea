"""Calibration data → activation statistics → strategies, centroid router, provenance, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from calib_helpers import add_tokenizer, image_folder, text_file
from conftest import read_json, run_cli

from ckptforge import UpcycleOptions, upcycle
from ckptforge.calibration import centroid_router, collect_stats, statistics_for
from ckptforge.calibration_data import load_calibration
from ckptforge.errors import CalibrationError
from ckptforge.io.source import open_checkpoint


def test_image_folder_is_preprocessed_with_the_checkpoints_processor(tiny, tmp_path):
    from transformers import ViTImageProcessor

    src = tiny("vit")
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]).save_pretrained(src)
    data = load_calibration(image_folder(tmp_path / "imgs", count=10), open_checkpoint(str(src)), "image",
                            samples=6, batch_size=4)
    assert data.num_samples == 6 and [b["pixel_values"].shape[0] for b in data.batches()] == [4, 2]
    assert data.inputs["pixel_values"].shape[1:] == (1, 28, 28)
    assert -1.0 <= data.inputs["pixel_values"].min() and data.inputs["pixel_values"].max() <= 1.0


def test_text_and_jsonl_and_dataset_dir_are_tokenised(tiny, tmp_path):
    import datasets

    src = add_tokenizer(tiny("bert"))
    ckpt = open_checkpoint(str(src))
    txt = load_calibration(text_file(tmp_path / "c.txt", lines=5), ckpt, "text")
    assert txt.num_samples == 5 and txt.inputs["attention_mask"].sum() > 5
    (tmp_path / "c.jsonl").write_text('{"text": "the cat sat"}\n{"text": "a dog ran far"}\n')
    assert load_calibration(tmp_path / "c.jsonl", ckpt, "text").num_samples == 2
    datasets.Dataset.from_dict({"text": ["the sun", "red mat", "big cat"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_calibration(tmp_path / "ds", ckpt, "text").num_samples == 3


def test_bad_calibration_inputs(tiny, tmp_path):
    ckpt = open_checkpoint(str(tiny("vit")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(CalibrationError, match=r"^calibration folder '.*empty' has no images \(\.png/\.jpg/\.jpeg/\.bmp/"
                       r"\.gif/\.webp/\.tif/\.tiff\); put images in it \(nested folders are fine\) or pass a .txt/.jsonl file$"):
        load_calibration(tmp_path / "empty", ckpt, "image")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(CalibrationError, match="has no text; put one sample per line"):
        load_calibration(tmp_path / "blank.txt", ckpt, "text")
    text_file(tmp_path / "t.txt")
    with pytest.raises(CalibrationError, match="is text but the model takes image input; pass a folder of images$"):
        load_calibration(tmp_path / "t.txt", ckpt, "image")


def test_statistics_are_cached_by_source_and_settings(tiny, tmp_path):
    src = tiny("vit")
    ckpt = open_checkpoint(str(src))
    cache = tmp_path / "stats.pt"
    opts = UpcycleOptions(num_experts=4, strategy="importance", calibration=str(image_folder(tmp_path / "i")),
                          calib_samples=8, stats_cache=str(cache))
    first = statistics_for(ckpt, opts, [1, 3], "image")
    assert first.calibration["cache"] == "written" and first.layer(1).tokens == 8 * 17
    second = statistics_for(ckpt, opts, [1, 3], "image")
    assert second.calibration["cache"] == "hit" and torch.equal(second.layer(3).l2, first.layer(3).l2)
    opts.calib_samples = 6
    assert statistics_for(ckpt, opts, [1, 3], "image").calibration["cache"] == "written"


def test_hooks_see_the_dense_ffn_activations(tiny, tmp_path):
    import transformers

    src = tiny("vit")
    ckpt = open_checkpoint(str(src))
    data = load_calibration(image_folder(tmp_path / "i", count=4), ckpt, "image", samples=4)
    stats = collect_stats(ckpt, data, [1], needs={"scores", "centroids"}, device="cpu")
    model = transformers.ViTForImageClassification.from_pretrained(src).eval()
    seen = []
    mlp = model.vit.layers[1].mlp
    handle = mlp.fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(**data.inputs)
    handle.remove()
    torch.testing.assert_close(stats.layer(1).l1.float(), seen[0].abs().sum(0), rtol=1e-5, atol=1e-4)
    rows = centroid_router([torch.arange(0, 32), torch.arange(32, 64)], stats.layer(1), norm=2.0)
    assert rows.shape == (2, 32) and torch.allclose(rows.norm(dim=1), torch.full((2,), 2.0))


def test_upcycle_records_calibration_and_centroid_router(tiny, tmp_path):
    from safetensors.torch import load_file

    src = tiny("vit")
    opts = UpcycleOptions(num_experts=4, top_k=2, strategy="coactivation", router_init="centroid",
                          calibration=str(image_folder(tmp_path / "i")), calib_samples=8)
    upcycle(src, tmp_path / "moe", opts)
    prov = read_json(tmp_path / "moe" / "ckptforge.json")
    stats = prov["calibration"]["statistics"]
    assert stats["samples"] == 8 and stats["kind"] == "image" and stats["layers"]["1"]["tokens"] == 8 * 17
    assert prov["calibration"]["selection"]["1"]["part_sizes"] == [16]
    assert prov["options"]["strategy"] == "coactivation" and prov["options"]["calibration"] == str(tmp_path / "i")
    assert "| calibration |" in (tmp_path / "moe" / "README.md").read_text()
    router = load_file(tmp_path / "moe" / "model.safetensors")["vit.encoder.layer.1.moe.router.weight"]
    torch.testing.assert_close(router.norm(dim=1), torch.full((4,), 0.02 * 32**0.5))


def test_cli_exit_codes_for_calibration_problems(tiny, tmp_path):
    src = tiny("vit")
    # issue 12: importance alone now scores from the weights; coactivation still needs data
    r = run_cli("upcycle", str(src), "--out", str(tmp_path / "o"), "--strategy", "coactivation", "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == ("--strategy coactivation needs activation statistics; pass --calibration "
                                             "PATH (a folder of images, a .txt/.jsonl file or a dataset)")
    (tmp_path / "none").mkdir()
    r = run_cli("upcycle", str(src), "--out", str(tmp_path / "o"), "--strategy", "importance",
                "--calibration", str(tmp_path / "none"), "--expert-ratio", "0.5")
    assert r.returncode == 2 and "has no images (.png/.jpg/.jpeg/" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compare_strategies_json(tiny, tmp_path):
    src = tiny("vit")
    r = run_cli("compare-strategies", str(src), "--calibration", str(image_folder(tmp_path / "i")),
                "--experts", "4", "--top-k", "2", "--calib-samples", "12", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = {row["strategy"]: row for row in report["rows"]}
    assert set(rows) == {"copy-all", "random", "uniform", "importance", "coactivation", "granular"}
    assert rows["copy-all"]["init_gap"] < 1e-5 and rows["copy-all"]["overlap"] == 1.0
    assert rows["coactivation"]["coverage"] == 1.0 and rows["coactivation"]["overlap"] == 0.0
    assert rows["uniform"]["overlap"] == 1.0 and rows["uniform"]["coverage"] == 0.25
    assert all(row["init_gap"] > 1e-3 for name, row in rows.items() if name != "copy-all")
    assert report["heldout_samples"] == 3 and report["calibration"]["samples"] == 9


def test_init_gap_leaves_padded_positions_out(tiny):
    """compare-strategies' outputs are zero where the text batch is padding, for dense and MoE alike."""
    import transformers

    from ckptforge.calibration_data import CalibrationSet
    from ckptforge.compare import _final_outputs

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny("llama")).eval()
    ids = torch.randint(2, 100, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    data = CalibrationSet("t", "text", {"input_ids": ids, "attention_mask": mask}, batch_size=2, fingerprint="x")
    out = _final_outputs(model, data, n_held=4).reshape(4, 6, -1)
    assert (out[mask == 0] == 0).all()
    assert (out[mask == 1].abs().sum(-1) > 0).all()
