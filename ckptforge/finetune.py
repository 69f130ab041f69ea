"""``finetune``: a short, seeded recovery training of an upcycled MoE, beside its dense source
(``compare``) and the same MoE architecture from random init (``scratch``).

Every run sees the same data in the same order with the same batch size, steps and optimiser.
Devices and precision go through accelerate (CUDA + bf16 autocast when present, CPU otherwise;
``accelerate launch -m ckptforge finetune …`` for several processes). Outputs: ``finetune.json``,
``curves.png`` and a "Recovery" section in the model card.

    >>> report = finetune("out/tiny-vit-moe", FinetuneOptions(data="digits/", steps=200,
    ...                   compare="examples/tiny-vit-mnist"))              # doctest: +SKIP
    >>> report.recovery["moe_steps_to_dense"]                              # doctest: +SKIP
    60
"""

from __future__ import annotations

import json
import os
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptforge.version import __version__
from ckptforge.datasets import TaskData, load_task_data, task_for
from ckptforge.errors import PlanError, SourceError, UsageError
from ckptforge.io.paths import check_output, check_writable, local_paths, refuse_overlap
from ckptforge.io.source import AUX_FILE_PATTERNS, open_checkpoint, read_json_object, sha256_file
from ckptforge.io.writer import AtomicOutput
from ckptforge.loading import config_object, load_model, model_class
from ckptforge.checkpoints import check_resume_dir
from ckptforge.schedules import SCHEDULES
from ckptforge.trainable import TRAIN_CHOICES, LoraSettings, apply_lora, apply_train, import_peft, is_lora
from ckptforge.training import RunResult, StepCallback, TrainSettings, train_run

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
ADAPTER_DIR = "adapter"  # issue 13: --lora adapters (peft format) beside the saved model


@dataclass
class FinetuneOptions:
    """Everything one ``finetune`` call uses; recorded in ``finetune.json``."""

    data: str
    steps: int = 200
    compare: str | None = None
    scratch: bool = False
    lr: float = 1e-4
    batch_size: int = 16
    eval_every: int = 0
    eval_data: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    seq_len: int = 64
    aux_weight: float | None = None  # None: the weight the MoE's routers store
    weight_decay: float = 0.0
    warmup_steps: int = 0
    save: str | None = None
    report: str | None = None
    force: bool = False
    # issue 13: what trains, LoRA, schedule, clipping, checkpoints
    train: str = "all"
    lora: bool = False
    lora_rank: int = 8
    merge_lora: bool = False
    schedule: str = "constant"
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    resume: str | None = None

    def problems(self) -> list[str]:
        """Problems that need no model or data to find."""
        out = []
        if self.steps < 1:
            out.append(f"--steps {self.steps} trains nothing; use 1 or more steps")
        if self.batch_size < 1:
            out.append(f"--batch-size {self.batch_size} must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"--lr {self.lr:g} must be a positive finite number, e.g. 1e-4")
        for flag, value in (("--aux-weight", self.aux_weight), ("--weight-decay", self.weight_decay)):
            if value is not None and not (math.isfinite(value) and value >= 0):  # issue 11: inf / nan would train to NaN
                out.append(f"{flag} {value:g} must be a finite number ≥ 0")
        if self.eval_every < 0:
            out.append(f"--eval-every {self.eval_every} must be 0 (every steps/10) or positive")
        if self.seq_len < 2:
            out.append(f"--seq-len {self.seq_len} must be at least 2")
        if self.device not in DEVICES:
            out.append(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            out.append(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        return out + self._training_problems()

    def _training_problems(self) -> list[str]:  # issue 13
        out = []
        if self.train not in TRAIN_CHOICES:
            out.append(f"--train {self.train!r} is not one of {', '.join(TRAIN_CHOICES)}")
        if self.lora and self.train != "all":
            out.append(f"--lora trains adapters on the experts and freezes every base weight; drop --train {self.train}")
        if self.lora and self.scratch:
            out.append("--lora adapts trained weights; a random-init --scratch run has none to adapt: drop --scratch")
        if self.lora and self.lora_rank < 1:
            out.append(f"--lora-rank {self.lora_rank} must be at least 1")
        if self.merge_lora and not (self.lora and self.save):
            out.append("--merge-lora folds the adapters into the weights on --save; pass --lora and --save DIR")
        if self.schedule not in SCHEDULES:
            out.append(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            out.append(f"--warmup-steps {self.warmup_steps} must be 0 or more")
        if not self.max_grad_norm >= 0:
            out.append(f"--max-grad-norm {self.max_grad_norm:g} must be 0 (no clipping) or positive")
        if self.checkpoint_every < 0:
            out.append(f"--checkpoint-every {self.checkpoint_every} must be 0 (no checkpoints) or positive")
        if self.resume is not None:
            out += check_resume_dir(Path(self.resume))
        return out

    def settings(self, report_dir: Path | None = None) -> TrainSettings:
        every = self.eval_every or max(1, self.steps // 10)
        checkpoints = str(report_dir / "checkpoint") if self.checkpoint_every and report_dir else None
        return TrainSettings(self.steps, self.lr, self.batch_size, every, self.seed, self.aux_weight,
                             self.weight_decay, self.warmup_steps, self.schedule, self.max_grad_norm,
                             self.checkpoint_every, checkpoints, self.resume)


@dataclass
class FinetuneReport:
    """Curves of every run, settings, device, wall time, and the recovery summary."""

    model_dir: str
    report_dir: str
    options: dict[str, Any]
    settings: dict[str, Any]
    data: dict[str, Any]
    device: dict[str, Any]
    runs: list[RunResult]
    recovery: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0
    saved: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runs"] = [r.to_dict() for r in self.runs]
        d["ckptforge_version"] = __version__
        return d


def finetune(model_dir: str | Path, options: FinetuneOptions, on_step: StepCallback | None = None) -> FinetuneReport:
    """Train the MoE at ``model_dir`` (and the dense / scratch baselines) and write the report."""
    from ckptforge import recovery

    start = time.perf_counter()
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    if problems := options.problems():
        raise PlanError(problems)
    if options.lora:
        import_peft()  # issue 13: say how to install it before any work
    check_finetune_paths(model_dir, options)
    accelerator = make_accelerator(options.device, options.precision)
    try:
        data = load_task_data(options.data, config, model_dir, eval_data=options.eval_data,
                              seq_len=options.seq_len, seed=options.seed)
        candidates = _candidates(model_dir, config, options, data)
        report_dir = Path(options.report) if options.report else model_dir / "finetune"
        settings = options.settings(report_dir)
        runs, trained = [], {}
        for name, source, build in candidates:
            model, replaced = build()
            model = _select_trainable(model, options, name, replaced)
            run, trained[name] = train_run(name, source, model, data, settings, accelerator, on_step)
            run.head_replaced = replaced
            runs.append(run)
        report = FinetuneReport(
            str(model_dir), str(report_dir), asdict(options), asdict(settings), data.to_dict(),
            _device_info(accelerator, options), runs, recovery.summarise(runs, data.task),
        )
        report.wall_seconds = round(time.perf_counter() - start, 3)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if options.save:
                report.saved = str(save_model(trained["moe"], model_dir, Path(options.save), options.force,
                                              merge_lora=options.merge_lora))
            recovery.write_outputs(report, model_dir, report_dir)
        accelerator.wait_for_everyone()
        return report
    finally:
        _release(accelerator)


def make_accelerator(device: str, precision: str) -> Any:
    """An ``accelerate.Accelerator`` for ``--device`` / ``--precision``; CUDA without a GPU is a UsageError."""
    from accelerate import Accelerator

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or --device auto")
    on_gpu = device != "cpu" and torch.cuda.is_available()
    mixed = {"auto": "bf16" if on_gpu else "no", "fp32": "no", "bf16": "bf16"}[precision]
    if not on_gpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):  # issue 13
        raise UsageError("FSDP (an accelerate config with distributed_type FSDP) needs CUDA GPUs: accelerate runs "
                         "FSDP only on GPU-type devices; on CPU launch without the FSDP config "
                         "(accelerate launch --multi_gpu --num_processes N starts gloo CPU processes)")
    # cpu=True without a GPU: otherwise accelerate ignores a torchrun / `accelerate launch` world on CPU
    return Accelerator(cpu=not on_gpu, mixed_precision=mixed)


def _release(accelerator: Any) -> None:
    """Forget this call's precision so a later call in the same process may choose another
    (accelerate keeps it in a process-wide singleton); the process group itself stays."""
    from accelerate.state import AcceleratorState

    accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=False)


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SourceError(f"'{model_dir}' has no config.json; pass a model directory (a ckptforge upcycle output)")
    return read_json_object(path)


def check_finetune_paths(model_dir: Path, options: FinetuneOptions) -> None:
    """``--save`` and ``--report`` may not overwrite the model, the data or the ``--compare`` model
    (issue 11); ``--report`` may be the model directory itself (its files go beside the weights)."""
    inputs = local_paths([options.data, options.eval_data, options.compare])
    if options.save:
        check_output("--save", options.save, force=options.force, reads=[model_dir, *inputs])
    if options.report:
        check_writable("--report", options.report)
        if Path(options.report).exists() and not Path(options.report).is_dir():
            raise UsageError(f"--report '{options.report}' is a file; pass a directory")
        refuse_overlap("--report", options.report, inputs)


def _candidates(model_dir: Path, config: dict[str, Any], options: FinetuneOptions, data: TaskData) -> list:
    """(name, source, build) for each run; ``build()`` → (model, head replaced?). Checked up front."""
    labels = data.class_names
    runs = [("moe", str(model_dir), lambda: _seeded(load_model(model_dir, config), labels, options.seed))]
    if options.compare is not None:
        dense = open_checkpoint(options.compare)
        if task_for(dense.config) != data.task:
            raise UsageError(f"--compare {options.compare} is not a {data.task.name} model; "
                             "compare with the dense checkpoint the MoE was upcycled from")
        runs.append(("dense", dense.source,
                     lambda: _seeded(load_model(_weights_path(dense), dense.config), labels, options.seed)))
    if options.scratch:
        runs.append(("scratch", "random init", lambda: _seeded(_from_scratch(config, options.seed), labels, options.seed)))
    return runs


def _select_trainable(model: nn.Module, options: FinetuneOptions, run: str, head_replaced: bool) -> nn.Module:
    """--train freezes outside the chosen role; --lora wraps the model in peft adapters (issue 13)."""
    if options.lora:
        torch.manual_seed(options.seed)  # the adapters' init: same seed, same adapters
        return apply_lora(model, LoraSettings(options.lora_rank), run, head_replaced)
    return apply_train(model, options.train, run, head_replaced)


def _from_scratch(config: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(config)(config_object(config))


def _seeded(model: nn.Module, labels: list[str], seed: int) -> tuple[nn.Module, bool]:
    """Give a classifier a fresh, seeded head when the data has another number of classes."""
    if not labels or model.config.num_labels == len(labels):
        return model, False
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise UsageError(f"{type(model).__name__} has {model.config.num_labels} labels, the data "
                         f"{len(labels)}, and no linear 'classifier' to replace; use data with the model's labels")
    torch.manual_seed(seed)
    model.classifier = nn.Linear(head.in_features, len(labels))
    model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.num_labels = len(labels)
    return model, True


def _weights_path(ckpt: Any) -> Path:
    single = len(ckpt.weight_files) == 1
    if single and ckpt.weight_files[0].name not in ("model.safetensors", "pytorch_model.bin"):
        return ckpt.weight_files[0]
    return ckpt.root


def save_model(model: nn.Module, model_dir: Path, out: Path, force: bool = False, merge_lora: bool = False) -> Path:
    """Save the fine-tuned MoE to ``out`` (atomic) with the model dir's remote code and preprocessor files.
    A ``--lora`` model is saved as its frozen base plus peft's adapter in ``out/adapter``, or with the
    adapters folded into the weights (``merge_lora``).

        >>> save_model(model, Path("out/moe"), Path("out/moe-ft"))        # doctest: +SKIP
    """
    target = AtomicOutput(out, force, reads=[model_dir], flag="--save")
    target.check()
    with target as tmp:
        if is_lora(model) and not merge_lora:
            model.save_pretrained(tmp / ADAPTER_DIR)
        base = (model.merge_and_unload() if merge_lora else model.unload()) if is_lora(model) else model
        base.save_pretrained(tmp)
        for f in model_dir.iterdir():
            if f.suffix == ".py" or f.name in AUX_FILE_PATTERNS:
                shutil.copyfile(f, tmp / f.name)
        files = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        provenance = {"ckptforge_version": __version__, "finetuned_from": str(model_dir), "files": files}
        (tmp / "ckptforge.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return out


def _device_info(accelerator: Any, options: FinetuneOptions) -> dict[str, Any]:
    dev = accelerator.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": str(dev), "name": name, "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value),
            "requested": options.device,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
