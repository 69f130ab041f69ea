"""Remote code as Hugging Face ships it (issue 12): a vit_moe / bert_moe output holds one
``configuration_*.py`` and one self-contained ``modeling_*.py``, generated from ckptforge's own
sources, and loads with ``trust_remote_code=True`` where ``import ckptforge`` fails."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptforge
from ckptforge.families import OUTPUT_FORMATS
from ckptforge.io.source import sha256_file
from ckptforge.remote_code import RemoteCodeError, bundle
from conftest import cli_env

MODELING = Path(ckptforge.__file__).parent / "modeling"
#: tiny source kind → (output model type, Auto class, input of the dense model's modality)
CASES = {"vit": ("vit_moe", "AutoModelForImageClassification", "pixel_values", (2, 1, 28, 28)),
         "bert": ("bert_moe", "AutoModelForSequenceClassification", "input_ids", (2, 7))}

_LOAD_WITHOUT_CKPTFORGE = """
import json, sys, torch
sys.modules['ckptforge'] = None  # import ckptforge fails
import transformers
out = {}
for path, auto, key, shape in json.loads(sys.argv[1]):
    m, info = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.manual_seed(0)
    x = torch.randn(shape) if key == "pixel_values" else torch.randint(0, 100, shape)
    out[path] = [type(m).__module__, m.eval()(**{key: x}).logits.tolist()]
print(json.dumps(out))
"""


def test_outputs_ship_one_configuration_and_one_modeling_file_that_load_without_ckptforge(tiny, tmp_path):
    jobs, expected = [], {}
    for kind, (model_type, auto, key, shape) in CASES.items():
        out = tmp_path / model_type
        ckptforge.upcycle(tiny(kind), out, ckptforge.UpcycleOptions(num_experts=4, router={"type": "sphero"}))
        assert sorted(p.name for p in out.glob("*.py")) == [f"configuration_{model_type}.py", f"modeling_{model_type}.py"]
        config = json.loads((out / "config.json").read_text())
        assert {v.split(".")[0] for v in config["auto_map"].values()} == {f"configuration_{model_type}",
                                                                          f"modeling_{model_type}"}
        assert config["auto_map"]["AutoConfig"] == f"configuration_{model_type}.{OUTPUT_FORMATS[model_type].config_class}"
        recorded = json.loads((out / "ckptforge.json").read_text())["files"]
        for name in (f"configuration_{model_type}.py", f"modeling_{model_type}.py"):
            assert recorded[name] == sha256_file(out / name)
        assert (out / f"configuration_{model_type}.py").read_text() == bundle(MODELING / f"configuration_{model_type}.py")
        model = ckptforge.modeling.__dict__[config["architectures"][0]].from_pretrained(out).eval()
        torch.manual_seed(0)
        x = torch.randn(shape) if key == "pixel_values" else torch.randint(0, 100, shape)
        expected[str(out)] = model(**{key: x}).logits
        jobs.append([str(out), auto, key, list(shape)])
    env = cli_env()
    env["PYTHONPATH"] = ""
    done = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_CKPTFORGE, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for path, (module, logits) in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert module.startswith("transformers_modules")
        torch.testing.assert_close(torch.tensor(logits), expected[path], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["vit_moe", "bert_moe"])
def test_configuration_bundle_holds_the_shared_moe_fields_and_imports_only_transformers(model_type):
    tree = ast.parse(bundle(MODELING / f"configuration_{model_type}.py"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert imported | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} == {
        "__future__", "dataclasses", "transformers"}
    assert [n.name for n in tree.body if isinstance(n, ast.ClassDef)] == [
        "MoEConfigFields", OUTPUT_FORMATS[model_type].config_class]


def test_both_configs_take_the_moe_fields_from_one_class():
    from dataclasses import fields

    from ckptforge.modeling import BertMoEConfig, ViTMoEConfig
    from ckptforge.modeling.moe_config import MoEConfigFields

    moe = [(f.name, f.default) for f in fields(MoEConfigFields)]
    for cls in (ViTMoEConfig, BertMoEConfig):
        assert [(f.name, f.default) for f in fields(cls)][-len(moe):] == moe
        config = cls(intermediate_size=96, moe_layers=(1,))
        assert (config.moe_layers, config.expert_intermediate_size, config.moe_router) == (
            [1], 96, {"type": "topk", "normalize": True})


@pytest.mark.parametrize("model_type", ["vit_moe", "bert_moe"])
def test_modeling_bundle_imports_nothing_of_ckptforge_but_its_configuration(model_type):
    tree = ast.parse(bundle(MODELING / f"{model_type}.py"))
    relative = [(n.module, n.level) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    absolute |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert relative == [(f"configuration_{model_type}", 1)]
    assert absolute <= {"__future__", "torch", "transformers", "dataclasses", "typing", "math"}
    defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert {"build_moe_layer", "TopKRouter", "SoftMoEFeedForward", "router_settings", "SelfAttention"} <= defined


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg" / "modeling" / "thing.py"


def test_bundle_inlines_package_modules_in_dependency_order_with_their_imports_rewritten(tmp_path):
    entry = _package(tmp_path, {
        "pkg/modeling/thing.py": '"""Doc."""\nfrom __future__ import annotations\nimport math\n'
                                 "from ..moe.layer import (\n    double,\n)\nfrom .configuration_thing import Cfg\n\n"
                                 "def run(x):\n    return double(x) + math.floor(Cfg.offset)\n",
        "pkg/modeling/configuration_thing.py": "class Cfg:\n    offset = 1.5\n",
        "pkg/moe/layer.py": '"""Layer."""\nfrom .base import BASE\n\ndef double(x):\n    return 2 * x + BASE\n',
        "pkg/moe/base.py": "import math\n\nBASE = int(math.sqrt(9))\n",
    })
    text = bundle(entry)
    assert text.startswith('"""Doc."""\n\nfrom __future__ import annotations\n\nimport math\nfrom .configuration_thing import Cfg\n')
    assert text.index("BASE = ") < text.index("def double") < text.index("def run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "__init__.py").write_text("")
    (tmp_path / "out" / "thing.py").write_text(text)
    (tmp_path / "out" / "configuration_thing.py").write_text("class Cfg:\n    offset = 1.5\n")
    done = subprocess.run([sys.executable, "-c", "from out.thing import run; print(run(10))"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "24", done.stderr


@pytest.mark.parametrize(("extra", "message"), [
    ({"pkg/moe/base.py": "def double(x):\n    return x\n"}, "'double' is defined in both"),
    ({"pkg/moe/layer.py": "def double(x):\n    from .base import BASE\n    return BASE\n"}, "a relative import inside a function"),
    ({"pkg/moe/layer.py": "from .base import BASE as B\ndouble = B\n"}, "an aliased relative import"),
    ({"pkg/moe/base.py": "from .layer import double\n"}, "import cycle"),
])
def test_bundle_refuses_sources_it_cannot_inline(tmp_path, extra, message):
    files = {"pkg/modeling/thing.py": "from ..moe.layer import double\n",
             "pkg/moe/layer.py": "from .base import BASE\n\ndef double(x):\n    return x\n",
             "pkg/moe/base.py": "BASE = 1\n"}
    with pytest.raises(RemoteCodeError, match=message):
        bundle(_package(tmp_path, {**files, **extra}))
