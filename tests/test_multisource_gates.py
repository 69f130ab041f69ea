"""Prompt gates and the layer-by-layer runner (issue 14): equal to the whole-model forward, padding
never taken for "the last token", negative prompts subtracted, calibration statistics the same."""

from __future__ import annotations

import pytest
import torch
import transformers

from ckptforge.calibration import collect_stats
from ckptforge.calibration_data import load_calibration
from ckptforge.io.source import open_checkpoint
from ckptforge.multisource import LayerRunner, MoESpec, compute_gates
from ckptforge.multisource.gates import tokenize_prompts
from ckptforge.multisource.runner import collect_stats_layerwise
from ckptforge.multisource.spec import ExpertSpec

from calib_helpers import add_tokenizer, text_file
from conftest import build_tiny

POS = [("the cat sat on a mat while dogs ran", "big sun"), ("dogs ran far and fast under big red sun",),
       ("a mat", "the red cat sat")]
NEG = [(), ("the cat",), ()]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_runner_equals_whole_model_hidden_states_on_a_padded_batch(tmp_path, kind):
    src = build_tiny(kind, tmp_path / "m", num_hidden_layers=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :4] = 0
    seen = {}
    LayerRunner(open_checkpoint(src)).run([{"input_ids": ids, "attention_mask": mask}],
                                          visit=lambda i, b, h: seen.__setitem__(i, h.clone()))
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for i in range(3):
        assert torch.allclose(seen[i][real], want[i][real], atol=1e-5), i


def _whole_model_rows(src, spec: MoESpec, average: bool) -> torch.Tensor:
    """Router rows the slow way: each prompt alone through the whole model (no padding at all)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ckpt = open_checkpoint(src)

    def state(prompt: str) -> torch.Tensor:
        batch = tokenize_prompts([prompt], ckpt)
        with torch.no_grad():
            hs = model(**batch, output_hidden_states=True).hidden_states
        return torch.stack([h[0].mean(0) if average else h[0, -1] for h in hs[:-1]])  # L × d

    rows = []
    for e in spec.experts:
        v = torch.stack([state(p) for p in e.positive_prompts]).mean(0)
        if e.negative_prompts:
            v = v - torch.stack([state(p) for p in e.negative_prompts]).mean(0)
        rows.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(rows, 1)  # L × E × d


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates_take_each_prompts_last_real_token_and_subtract_negatives(tmp_path, mode):
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=3))
    spec = MoESpec(str(src), tuple(ExpertSpec("x", p, n) for p, n in zip(POS, NEG)), gate_mode=mode)
    gates = compute_gates(spec, open_checkpoint(src), [0, 1, 2], torch.Generator())
    want = _whole_model_rows(src, spec, average=mode == "hidden_avg")
    for layer in range(3):
        assert torch.allclose(gates.experts[layer], want[layer], atol=1e-5), layer


def test_position_minus_one_of_a_right_padded_batch_is_not_the_last_token(tmp_path):
    """Why padding must be masked: mergekit's position −1 of a right-padded batch reads a pad token."""
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=2))
    batch = tokenize_prompts(["a mat", "dogs ran far and fast under big red sun"], open_checkpoint(src))
    assert batch["attention_mask"][0, -1] == 0  # the short prompt is padded
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        padded = model(**batch, output_hidden_states=True).hidden_states[1][0, -1]
        alone = model(**tokenize_prompts(["a mat"], open_checkpoint(src)), output_hidden_states=True).hidden_states[1][0, -1]
    assert not torch.allclose(padded, alone, atol=1e-3)
    spec = MoESpec(str(src), (ExpertSpec("x", ("a mat",)), ExpertSpec("y", ("dogs ran far and fast under big red sun",))),
                   gate_mode="hidden")
    rows = compute_gates(spec, open_checkpoint(src), [1], torch.Generator()).experts[1]
    assert torch.allclose(rows[0], alone / alone.norm(), atol=1e-5)


def test_cheap_embed_is_the_normalised_sum_of_prompt_embeddings_in_every_layer(tmp_path):
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=2))
    ckpt = open_checkpoint(src)
    spec = MoESpec(str(src), tuple(ExpertSpec("x", p, n) for p, n in zip(POS, NEG)), gate_mode="cheap_embed")
    gates = compute_gates(spec, ckpt, [0, 1], torch.Generator())
    embed = ckpt.read("model.embed_tokens.weight").float()

    def side(prompts):
        b = tokenize_prompts(list(prompts), ckpt)
        v = (embed[b["input_ids"]] * b["attention_mask"].unsqueeze(-1)).sum((0, 1))
        return v / v.norm()

    for e, (p, n) in enumerate(zip(POS, NEG)):
        v = side(p) - side(n) if n else side(p)
        assert torch.allclose(gates.experts[0][e], v / v.norm(), atol=1e-6)
        assert torch.equal(gates.experts[0][e], gates.experts[1][e])


def test_random_gates_are_seeded_and_uniform_random_is_linear_init_range(tmp_path):
    src = build_tiny("llama", tmp_path / "m", num_hidden_layers=2)
    ckpt = open_checkpoint(src)
    spec = MoESpec(str(src), (ExpertSpec("a"), ExpertSpec("b"), ExpertSpec("c")), gate_mode="random")
    a = compute_gates(spec, ckpt, [0, 1], torch.Generator().manual_seed(1)).experts
    b = compute_gates(spec, ckpt, [0, 1], torch.Generator().manual_seed(1)).experts
    c = compute_gates(spec, ckpt, [0, 1], torch.Generator().manual_seed(2)).experts
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    uni = compute_gates(MoESpec(str(src), spec.experts, gate_mode="uniform_random"), ckpt, [0, 1],
                        torch.Generator().manual_seed(1)).experts
    assert uni[0].abs().max() <= 32 ** -0.5 and uni[0].abs().max() > 0.8 * 32 ** -0.5


def test_layerwise_calibration_statistics_equal_the_whole_model_path(tmp_path):
    src = add_tokenizer(build_tiny("llama", tmp_path / "m", num_hidden_layers=3))
    ckpt = open_checkpoint(src)
    data = load_calibration(text_file(tmp_path / "c.txt", lines=10), ckpt, "text", batch_size=4)
    needs = {"scores", "coactivation", "centroids"}
    whole = collect_stats(ckpt, data, [0, 2], needs=needs, device="cpu")
    layered = collect_stats_layerwise(ckpt, data, [0, 2], needs=needs)
    for i in (0, 2):
        w, l = whole.layer(i), layered.layer(i)
        assert w.tokens == l.tokens > 0
        for name in ("l1", "sq", "count", "input_sums", "input_total"):
            assert torch.allclose(getattr(w, name), getattr(l, name), rtol=1e-5, atol=1e-6), (i, name)
        assert torch.equal(w.coactivation, l.coactivation)


def test_runner_reads_only_the_embedding_rows_the_tokens_use(tmp_path):
    """A TinyLlama vocabulary is 131 MB of bf16; a few prompts use a few rows (runs of consecutive ids are
    read at once, gaps skipped); a token id outside the vocabulary is refused, and a layer whose stored
    shape differs from its config is named."""
    from ckptforge.errors import UsageError
    from safetensors.torch import load_file, save_file

    src = build_tiny("llama", tmp_path / "m", num_hidden_layers=2)
    runner = LayerRunner(open_checkpoint(src))
    full = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    rows = torch.tensor([0, 3, 4, 5, 9, 127])
    assert torch.equal(runner.read_rows(runner.decoder.embed_tokens, "weight", rows), full[rows])
    ids = [torch.tensor([[5, 3, 3, 9]]), torch.tensor([[127, 0], [4, 5]])]
    for got, i in zip(runner.embed(ids), ids):
        assert torch.equal(got, torch.nn.functional.embedding(i, full).float())
    with pytest.raises(UsageError, match="token id 128 is outside the embedding's 128 rows"):
        runner.embed([torch.tensor([[1, 128]])])
    state = load_file(src / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:, :1].contiguous()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    runner = LayerRunner(open_checkpoint(src))
    with pytest.raises(UsageError, match=r"model.layers.1.mlp.up_proj.weight has shape \(64, 1\) in the checkpoint"):
        runner.materialise(runner.layers[1])
