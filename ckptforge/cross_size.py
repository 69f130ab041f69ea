"""Cross-size recycling (MoE Jetpack): experts of a student's MoE layers sliced from a *wider*
teacher's FFN — hidden units chosen by the strategy (importance by default) and d_student of the
teacher's d_teacher channels chosen by importance at the teacher's FFN input (the root-sum-square
of the calibration activations there, summed over the MoE layers: one channel set for the whole
residual stream).

A student checkpoint keeps its non-FFN weights (embeddings, attention, norms, head) and its dense
layers; only the experts come from the teacher. A student given as a config only has every weight
sliced from the teacher on the same channels (:mod:`ckptforge.cross_size_student`).
Layer i of the student takes the FFN of layer i of the teacher.

    >>> top_channels(torch.tensor([0.1, 3.0, 0.2, 2.0]), 2).tolist()
    [1, 3]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ckptforge.errors import UnsupportedArchitectureError
from ckptforge.families import Dims, detect_family
from ckptforge.io.source import DenseCheckpoint

#: Strategies whose experts are sampled subsets of width S: the ones that can draw S of the
#: teacher's d_ff units (copy-all takes every unit; partitions split d_ff into E parts).
CROSS_SIZE_STRATEGIES = ("importance", "random", "uniform")


@dataclass(frozen=True)
class Teacher:
    """The teacher a plan recycles from: its reference, family and sizes."""

    source: str
    family: str
    dims: Dims
    #: how a config-only student was cut from the teacher (None: the student has its own weights)
    student: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "family": self.family, "hidden_size": self.dims.hidden_size,
                "intermediate_size": self.dims.intermediate_size, "num_layers": self.dims.num_layers,
                "student": self.student}


def teacher_problems(teacher: DenseCheckpoint, family: Any, dims: Dims, options: Any, expert_width: int,
                     moe_layers: list[int], student: Any = None) -> tuple[Teacher | None, list[str]]:
    """The teacher and every problem of using it for this student (found before a tensor is read);
    ``student``: the student checkpoint (a config-only one says how it was cut)."""
    ref = options.teacher
    try:
        tfamily = detect_family(teacher.config)
    except UnsupportedArchitectureError:
        return None, [f"--teacher {ref} is a {teacher.config.get('model_type')!r} model, not a {family.name} "
                      f"model like the student; use a wider {family.name} checkpoint"]
    if tfamily.name != family.name:
        return None, [f"--teacher {ref} is a {tfamily.name} model and the student a {family.name} model; "
                      f"use a wider {family.name} checkpoint"]
    tdims = tfamily.dims(teacher.config)
    problems = []
    if tdims.hidden_size < dims.hidden_size:
        problems.append(f"--teacher {ref} has hidden size {tdims.hidden_size}, smaller than the student's "
                        f"{dims.hidden_size}; cross-size recycling slices a wider teacher")
    if tdims.intermediate_size < expert_width:
        problems.append(f"--teacher {ref} has d_ff {tdims.intermediate_size}, fewer units than the expert width "
                        f"{expert_width}; lower --expert-width or use a wider teacher")
    if moe_layers and tdims.num_layers <= max(moe_layers):
        problems.append(f"--teacher {ref} has {tdims.num_layers} layers; student MoE layer {max(moe_layers)} takes "
                        f"the FFN of the teacher's layer {max(moe_layers)}: use a teacher at least as deep or fewer --layers")
    if tdims.activation != dims.activation or tdims.gated != dims.gated:
        problems.append(f"--teacher {ref} has activation {tdims.activation}, the student {dims.activation}; "
                        "the experts would compute another function")
    if options.strategy not in CROSS_SIZE_STRATEGIES:
        problems.append(f"--teacher slices S of the teacher's d_ff units, and --strategy {options.strategy} cannot; "
                        f"use one of {', '.join(CROSS_SIZE_STRATEGIES)} (importance by default)")
    if options.strategy_params.get("mode") == "partition":
        problems.append("--teacher needs sampled experts; drop --coactivation-mode partition")
    if options.router_init == "centroid":
        problems.append("--router-init centroid measures the teacher's inputs, not the student's; "
                        "use --router-init normal or zeros with --teacher")
    summary = student.summary() if hasattr(student, "summary") else None
    return Teacher(teacher.source, tfamily.name, tdims, summary), problems


def top_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring channels, sorted by index (ties: the lower index)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:count].sort().values


def choose_channels(stats: Any, layers: list[int], count: int) -> torch.Tensor:
    """d_student channels of the teacher by importance at its FFN inputs: √Σx² over calibration
    tokens, the squares summed over the MoE ``layers``."""
    energy = sum(stats.layer(layer).input_sq.cpu() for layer in layers)
    return top_channels(energy.sqrt(), count)


def slice_channels(t: torch.Tensor, role: str, channels: torch.Tensor | None) -> torch.Tensor:
    """Keep ``channels`` of the model dimension of an expert tensor: columns of gate/up, rows of
    down, entries of down_bias (up_bias has no model dimension)."""
    if channels is None or role == "up_bias":
        return t
    if role in ("gate", "up"):
        return t[:, channels]
    return t[channels]
