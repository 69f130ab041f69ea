"""One input pipeline (issue 12, defect 5): the same image reaches the model as the same tensor in
calibration, ``finetune``, ``eval`` and ``routes`` — the checkpoint's own image processor — and the
same sentence as the same token ids in calibration, ``finetune`` and prompt gates; a model without
a tokenizer is refused the same way by every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from calib_helpers import add_tokenizer
from conftest import REPO
from PIL import Image

import ckptforge
from ckptforge.calibration_data import load_calibration
from ckptforge.datasets import load_task_data
from ckptforge.errors import UsageError
from ckptforge.evaluate import EvalOptions, evaluate
from ckptforge.io.source import open_checkpoint
from ckptforge.loading import load_model
from ckptforge.multisource.gates import tokenize_prompts
from ckptforge.routes import _inputs as routes_inputs, route_input, top_experts

TINY_VIT = REPO / "examples" / "tiny-vit-mnist"
TINY_LLAMA = REPO / "examples" / "tiny-llama-pydoc"


def _vit(tmp_path: Path, processor: dict | None) -> Path:
    """The shipped tiny ViT, with its preprocessor_config.json changed by ``processor`` (None: removed)."""
    dense = tmp_path / "dense"
    shutil.copytree(TINY_VIT, dense)
    pre = dense / "preprocessor_config.json"
    if processor is None:
        pre.unlink()
    else:
        pre.write_text(json.dumps({**json.loads(pre.read_text()), **processor}))
    return dense


def _image_folder(root: Path) -> tuple[Path, Path]:
    """One 40×40 RGB PNG (so resizing and the grey conversion happen), in class folders '3' and '7'."""
    png = root / "in.png"
    root.mkdir()
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(png)
    for label in ("3", "7"):
        (root / "data" / label).mkdir(parents=True)
        shutil.copy(png, root / "data" / label / "in.png")
    return png, root / "data"


@pytest.mark.parametrize("processor", [{}, {"image_mean": [0.2], "image_std": [0.3], "resample": 3}, None],
                         ids=["shipped", "own-mean-std", "no-processor-file"])
def test_one_image_is_the_same_tensor_in_every_command(tmp_path, processor):
    from transformers import AutoImageProcessor, ViTImageProcessor

    dense = _vit(tmp_path, processor)
    moe = tmp_path / "moe"
    ckptforge.upcycle(dense, moe, ckptforge.UpcycleOptions(num_experts=4, top_k=2, layers="all", seed=0))
    if processor is None:  # the documented fallback: ViT's processor sized from config.json
        ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]).save_pretrained(
            tmp_path / "fallback")
    png, folder = _image_folder(tmp_path / "img")
    own = AutoImageProcessor.from_pretrained(tmp_path / "fallback" if processor is None else moe)
    expected = own(images=Image.open(png).convert("L"), return_tensors="pt")["pixel_values"]

    config = json.loads((moe / "config.json").read_text())
    calibration = load_calibration(folder, open_checkpoint(str(dense)), "image", samples=2).inputs["pixel_values"]
    finetune = load_task_data(str(folder), config, moe, eval_data=str(folder)).train.tensors[0]
    model = load_model(moe)
    routes = routes_inputs(moe, model.config, png)[0]["pixel_values"]
    for got in (calibration[0], calibration[1], finetune[0], finetune[1], routes[0]):
        assert torch.equal(got, expected[0])

    # what a user sees: eval's loss and routes' top experts are those of a forward on these pixels
    with torch.no_grad():
        logits = model(pixel_values=expected.expand(2, -1, -1, -1)).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([3, 7])).item()
    assert evaluate(moe, EvalOptions(data=str(folder))).rows[0].loss == pytest.approx(loss, rel=1e-6)
    with torch.no_grad():
        model(pixel_values=expected)
    by_hand = {i: top_experts(layer.moe, 17)[0].tolist() for i, layer in enumerate(model.vit.encoder.layer)}
    report = route_input(moe, png)
    assert {i: r.top_expert for i, r in report.layers.items()} == by_hand


def test_one_sentence_is_the_same_ids_in_calibration_finetune_and_gates(tmp_path):
    from transformers import AutoTokenizer

    sentence = "Assignment statements are used to (re)bind names to values."
    expected = AutoTokenizer.from_pretrained(TINY_LLAMA)(sentence)["input_ids"]
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": sentence}) + "\n")
    (tmp_path / "four.jsonl").write_text((json.dumps({"text": sentence}) + "\n") * 4)
    ckpt = open_checkpoint(str(TINY_LLAMA))

    calibration = load_calibration(tmp_path / "one.jsonl", ckpt, "text").inputs["input_ids"][0]
    # the causal-LM reader concatenates the rows' ids into blocks of seq_len + 1: one sentence each
    blocks = load_task_data(str(tmp_path / "four.jsonl"), ckpt.config, TINY_LLAMA, seq_len=len(expected) - 1,
                            eval_data=str(tmp_path / "four.jsonl")).train.tensors[0]
    gates = tokenize_prompts([sentence], ckpt)["input_ids"][0]
    assert calibration.tolist() == gates.tolist() == expected
    assert blocks.tolist() == [expected] * 4


def test_a_model_without_tokenizer_files_is_refused_by_every_command(tiny, tmp_path):
    llama, bert = tiny("llama"), tiny("bert")  # transformers would build an empty-vocabulary BERT tokenizer
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    bert_moe = tmp_path / "bert-moe"
    ckptforge.upcycle(bert, bert_moe, ckptforge.UpcycleOptions(num_experts=4, layers="all"))

    def refused(model: Path, needed_for: str, call) -> None:
        with pytest.raises(UsageError) as err:
            call()
        assert str(err.value) == (
            f"'{model}' has no tokenizer files (tokenizer.json / tokenizer_config.json) and {needed_for} needs the "
            "model's own tokenizer; copy the dense model's tokenizer files next to its config.json")

    for model in (llama, bert):
        ckpt = open_checkpoint(str(model))
        refused(model, "text calibration", lambda: load_calibration(text, ckpt, "text"))
    refused(llama, "finetune / eval on text",
            lambda: load_task_data(str(text), open_checkpoint(str(llama)).config, llama, seq_len=8))
    refused(llama, "prompt gates (gate_mode random needs no tokenizer)",
            lambda: tokenize_prompts(["a cat"], open_checkpoint(str(llama))))
    refused(bert_moe, "routing text", lambda: route_input(bert_moe, text))
    add_tokenizer(llama)
    assert load_calibration(text, open_checkpoint(str(llama)), "text").inputs["input_ids"].shape[0] == 50


def test_a_processor_that_does_not_fit_the_model_is_refused_by_every_command(tmp_path, capsys):
    from ckptforge.cli import main

    moe = tmp_path / "moe"
    ckptforge.upcycle(_vit(tmp_path, {"size": {"height": 32, "width": 32}}), moe,
                      ckptforge.UpcycleOptions(num_experts=4, layers="all"))
    png, folder = _image_folder(tmp_path / "img")
    message = (f"error: preprocessed images have shape (1, 32, 32), the model wants (1, 28, 28); "
               f"fix preprocessor_config.json in {moe}")
    for args in (["routes", str(moe), "--input", str(png)], ["finetune", str(moe), "--data", str(folder), "--steps", "1"],
                 ["eval", str(moe), "--data", str(folder)]):
        assert main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (moe / "finetune").exists()


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet-folder"])
def test_one_dataset_rule_for_calibration_and_finetune(tmp_path, layout):
    """A saved dataset and a folder of Parquet files are read by calibration and finetune alike (finetune
    refused the Parquet folder); a folder that is neither images nor a dataset is refused by both
    (exit 2, naming the folder)."""
    import datasets

    sentence = "Assignment statements are used to (re)bind names to values."
    rows = datasets.Dataset.from_dict({"text": [sentence] * 4})
    data = tmp_path / "ds"
    if layout == "save_to_disk":
        rows.save_to_disk(str(data))
    else:
        data.mkdir()
        rows.to_parquet(str(data / "train.parquet"))
    ckpt = open_checkpoint(str(TINY_LLAMA))
    expected = load_calibration(data, ckpt, "text").inputs["input_ids"][0].tolist()
    blocks = load_task_data(str(data), ckpt.config, TINY_LLAMA, seq_len=len(expected) - 1, eval_data=str(data))
    assert blocks.train.tensors[0].tolist() == [expected] * 4

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.csv").write_text("a,b\n")  # neither images nor a dataset
    readers = (lambda ref: load_calibration(ref, ckpt, "text"), lambda ref: load_task_data(ref, ckpt.config, TINY_LLAMA))
    for read in readers:
        with pytest.raises(UsageError, match=f"'{odd}'"):
            read(str(odd))
