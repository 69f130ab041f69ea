"""A student given as a config only (MoE Jetpack's cross-size recycling, issue 13): every weight of
the student is sliced from the wider teacher.

STUDENT is then a directory holding ``config.json`` and no weights, or a ``.json`` config file —
what ``AutoConfig.from_pretrained`` / ``from_json_file`` read. Keys the student's config leaves out
are the teacher's, so ``{"hidden_size": 64, "intermediate_size": 256}`` is a whole student.
Its tensors are those of the student's transformers class (built on the meta device), each read
from the teacher's tensor of the same name and narrowed along every axis that differs:

- model channels: the d_student channels the teacher's MoE-layer FFN inputs carry the most
  energy on (the experts' channels, :func:`ckptforge.cross_size.choose_channels`; set once the
  calibration statistics are in, :meth:`SlicedStudent.use_channels`);
- attention: whole heads (key/value heads, then query heads inside each kept group) and, where
  the student's head dim is smaller and the positions are not rotary, head dims — both by weight
  norm (‖W_q‖² + ‖W_k‖² + ‖W_v‖² + ‖W_o‖² of the head / dim), per layer;
- the FFN units of dense (not MoE) layers: the top d_ff_student by the data-free ``weight-norm``
  score; position tables: the first rows.

Every other size must equal the teacher's; every problem is reported up front (PlanError).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptforge.errors import PlanError, SourceError
from ckptforge.io.source import AUX_FILE_PATTERNS, DenseCheckpoint, TensorInfo, open_checkpoint, read_json_object

if TYPE_CHECKING:
    import torch

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")
#: Attention tensors by name (ViT/BERT ``query``, LLaMA/Qwen ``q_proj``, …) → their axis kinds.
_ATTENTION = [
    (re.compile(r"\.(query|q_proj)\.weight$"), ("q", "d")), (re.compile(r"\.(query|q_proj)\.bias$"), ("q",)),
    (re.compile(r"\.(key|k_proj|value|v_proj)\.weight$"), ("kv", "d")),
    (re.compile(r"\.(key|k_proj|value|v_proj)\.bias$"), ("kv",)),
    (re.compile(r"(attention\.output\.dense|o_proj)\.weight$"), ("d", "q")),
]
_FFN_AXES = {"up": ("ff", "d"), "gate": ("ff", "d"), "up_bias": ("ff",), "down": ("d", "ff"), "down_bias": ("d",)}
_LAYER = re.compile(r"\.(\d+)\.")


def config_only(ref: str) -> Path | None:
    """The config file of a weightless STUDENT (a ``.json`` file, or a directory with
    ``config.json`` and no weight files); None for anything else."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / "config.json").is_file() and not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        return path / "config.json"
    return None


def open_student(ref: str, teacher: str | None) -> DenseCheckpoint:
    """STUDENT as a checkpoint, or — with a teacher — as a config only, sliced from the teacher."""
    config = config_only(str(ref))
    if config is None:
        return open_checkpoint(ref)
    if not teacher:
        raise SourceError(f"'{ref}' is a config without weights; add --teacher BIG to slice its weights from a "
                          "wider checkpoint of the same family, or pass a checkpoint with weights")
    return SlicedStudent.build(str(ref), config, open_checkpoint(teacher))


@dataclass
class Heads:
    """Attention shape of a config: query heads, key/value heads, head dim, rotary or not."""

    q: int
    kv: int
    dim: int
    rotary: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> Heads:
        q = int(config.get("num_attention_heads") or 1)
        dim = config.get("head_dim") or config["hidden_size"] // q
        rotary = any(config.get(k) for k in ("rope_theta", "rope_parameters", "rope_scaling"))
        return cls(q, int(config.get("num_key_value_heads") or q), int(dim), rotary)


def head_problems(student: Heads, teacher: Heads) -> list[str]:
    """Why the student's heads cannot be cut from the teacher's (empty when they can)."""
    problems = []
    if student.q % student.kv:
        problems.append(f"the student's {student.q} attention heads do not split into {student.kv} key/value heads")
    elif student.kv > teacher.kv or student.q // student.kv > teacher.q // teacher.kv:
        problems.append(f"the student has {student.q} attention heads ({student.kv} key/value), more than the "
                        f"teacher's {teacher.q} ({teacher.kv}); use at most the teacher's heads")
    if student.dim > teacher.dim:
        problems.append(f"the student's head dim {student.dim} is larger than the teacher's {teacher.dim}")
    elif student.dim != teacher.dim and teacher.rotary:
        problems.append(f"the student's head dim {student.dim} differs from the teacher's {teacher.dim}, and rotary "
                        "positions tie the head dim to their frequencies: keep head_dim and use fewer heads")
    return problems


def _meta_tensors(config: dict[str, Any], teacher: DenseCheckpoint) -> dict[str, tuple[int, ...]]:
    """Name → shape of every stored tensor of ``config``'s transformers class (tied ones once),
    named as the teacher stores it (transformers' legacy or current names: the family's renames)."""
    import torch
    import transformers

    from ckptforge.families import detect_family

    options = {k: v for k, v in config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **options)
    cls = getattr(transformers, (config.get("architectures") or [""])[0], None)
    if cls is None:
        raise PlanError([f"the student config names architecture {config.get('architectures')}, which transformers "
                         "does not have; set \"architectures\" to the teacher's"])
    with torch.device("meta"):
        model = cls(cfg)
    seen: set[int] = set()
    shapes = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            shapes[name] = tuple(t.shape)
    family = detect_family(teacher.config)
    stored = family.canonical_names(list(teacher.tensors))
    return {stored.get(canon, name): shapes[name] for canon, name in family.canonical_names(list(shapes)).items()}


@dataclass
class SlicedStudent(DenseCheckpoint):
    """A student checkpoint whose tensors are read from the teacher and narrowed on demand."""

    teacher: DenseCheckpoint | None = None
    config_path: Path | None = None
    axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    channels: torch.Tensor | None = None
    _index: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, ref: str, config_path: Path, teacher: DenseCheckpoint) -> SlicedStudent:
        """Lay out the student from its config and check every tensor against the teacher's."""
        own = read_json_object(config_path)
        if own.get("model_type", teacher.config.get("model_type")) != teacher.config.get("model_type"):
            raise PlanError([f"the student config is a {own.get('model_type')!r} model and the teacher "
                             f"{teacher.source} a {teacher.config.get('model_type')!r} model; use a teacher of the same family"])
        config = {**teacher.config, **own}
        for key in ("architectures", "model_type"):
            config[key] = own.get(key) or teacher.config.get(key)
        problems = head_problems(Heads.of(config), Heads.of(teacher.config))
        depth = config.get("num_hidden_layers", 0), teacher.config.get("num_hidden_layers", 0)
        if depth[0] > depth[1]:
            problems.append(f"the student config has {depth[0]} layers and the teacher {depth[1]}; student layer i "
                            f"is cut from teacher layer i: use at most {depth[1]} layers")
        shapes = _meta_tensors(config, teacher) if not problems else {}
        axes: dict[str, tuple[str, ...]] = {}
        roles = _ffn_roles(teacher)
        for name, shape in shapes.items():
            info = teacher.tensors.get(name)
            if info is None:
                problems.append(f"the teacher {teacher.source} has no tensor {name} that the student needs "
                                "(more layers, or another architecture); make the student's config match")
                continue
            kinds, why = _axes(name, shape, info.shape, roles.get(name), config, teacher.config)
            problems += why
            axes[name] = kinds
        if problems:
            teacher.close()
            raise PlanError(problems[:1] + ([f"and {len(problems) - 1} more"] if len(problems) > 1 else []))
        tensors = {n: TensorInfo(n, teacher.tensors[n].file, teacher.tensors[n].dtype_name, shapes[n]) for n in axes}
        return cls(ref, config_path.parent, config, tensors, [], None, teacher=teacher, config_path=config_path,
                   axes=axes)

    def use_channels(self, channels: torch.Tensor) -> None:
        """The teacher channels the student keeps (the experts' channels)."""
        self.channels = channels

    def read(self, name: str) -> torch.Tensor:
        t = self.teacher.read(name)
        for axis, kind in enumerate(self.axes[name]):
            if kind != "keep":
                t = t.index_select(axis, self._indices(kind, name, self.tensors[name].shape[axis]))
        return t.contiguous()

    def _indices(self, kind: str, name: str, size: int) -> torch.Tensor:
        import torch

        if kind == "d":
            if self.channels is None:
                raise PlanError(["the student's channels are chosen from calibration statistics; pass --calibration"])
            return self.channels
        if kind == "prefix":
            return torch.arange(size)
        layer = int(_LAYER.search(name).group(1))
        if (kind, layer) not in self._index:
            if kind == "ff":
                self._index[kind, layer] = _dense_units(self.teacher, layer, size)
            else:
                q, kv = _head_indices(self.teacher, layer, Heads.of(self.config), Heads.of(self.teacher.config))
                self._index["q", layer], self._index["kv", layer] = q, kv
        return self._index[kind, layer]

    def file_hashes(self) -> dict[str, str]:
        from ckptforge.io.hashing import file_sha256

        return {self.config_path.name: file_sha256(self.config_path)}

    def aux_files(self) -> list[Path]:
        """The student's own tokenizer / preprocessor files, else the teacher's."""
        own = [self.root / n for n in AUX_FILE_PATTERNS if (self.root / n).is_file()]
        return own or self.teacher.aux_files()

    def read_paths(self) -> list[Path]:
        return [self.config_path, *self.aux_files(), *([self.root] if self.config_path.name == "config.json" else [])]

    def close(self) -> None:
        self.teacher.close()

    def summary(self) -> dict[str, Any]:
        """What the card and ``ckptforge.json`` say about how the student was cut."""
        s, t = Heads.of(self.config), Heads.of(self.teacher.config)
        return {"config": str(self.config_path), "heads": f"{s.q} of {t.q}", "head_dim": f"{s.dim} of {t.dim}",
                "rule": "every weight sliced from the teacher: the experts' channels; heads, head dims and "
                        "dense-layer FFN units by weight norm"}


def _ffn_roles(teacher: DenseCheckpoint) -> dict[str, str]:
    """Stored FFN tensor name → role (up, gate, down, up_bias, down_bias) of every teacher layer."""
    from ckptforge.families import detect_family

    family = detect_family(teacher.config)
    canonical = family.canonical_names(list(teacher.tensors))
    prefix = family.base_prefix(set(canonical)) or ""
    layers = family.dims(teacher.config).num_layers
    return {canonical[n]: role for layer in range(layers) for role, n in family.ffn_names(prefix, layer).items()
            if n in canonical}


def _axes(name: str, student: tuple[int, ...], teacher: tuple[int, ...], role: str | None,
          s_config: dict[str, Any], t_config: dict[str, Any]) -> tuple[tuple[str, ...], list[str]]:
    """Each axis's kind (d, ff, q, kv, prefix or keep) and the problem if the shapes cannot match."""
    kinds = _FFN_AXES.get(role) or next((k for pattern, k in _ATTENTION if pattern.search(name)), None)
    if kinds is None:
        ds, dt = s_config["hidden_size"], t_config["hidden_size"]
        kinds = tuple("keep" if s == t else "d" if (s, t) == (ds, dt) else "prefix" if "position" in name and s < t
                      else "?" for s, t in zip(student, teacher))
    if len(student) != len(teacher) or len(kinds) != len(student) or "?" in kinds or any(
            k == "keep" and s != t or s > t for k, s, t in zip(kinds, student, teacher)):
        shown = "×".join(map(str, teacher)), "×".join(map(str, student))
        return kinds, [f"{name} is {shown[0]} in the teacher and {shown[1]} in the student: only the hidden size, "
                       "FFN width, attention heads and position tables may be smaller; take the other config "
                       "values from the teacher"]
    return tuple("keep" if s == t else k for k, s, t in zip(kinds, student, teacher)), []


def _dense_units(teacher: DenseCheckpoint, layer: int, count: int) -> torch.Tensor:
    """The top ``count`` FFN units of the teacher's ``layer`` by the data-free weight-norm score."""
    from ckptforge.cross_size import top_channels
    from ckptforge.strategies import DenseFFN
    from ckptforge.strategies.importance import DATA_FREE_SCORES

    roles = {n: r for n, r in _ffn_roles(teacher).items() if _LAYER.search(n).group(1) == str(layer)}
    ffn = DenseFFN({r: teacher.read(n) for n, r in roles.items()})
    return top_channels(DATA_FREE_SCORES["weight-norm"](ffn), count)


def _head_indices(teacher: DenseCheckpoint, layer: int, s: Heads, t: Heads) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of the kept query heads and key/value heads (with their kept dims)."""
    import torch

    from ckptforge.cross_size import top_channels

    mine = [n for n in teacher.tensors if _LAYER.search(n) and _LAYER.search(n).group(1) == str(layer)]
    def energy(kind: str) -> torch.Tensor:  # squared norm per attention row (q or kv rows)
        out = 0
        for n in mine:
            kinds = next((k for pattern, k in _ATTENTION if pattern.search(n)), ())
            if kind in kinds and n.endswith("weight"):
                w = teacher.read(n).double() ** 2
                out = out + (w.sum(dim=1) if kinds[0] == kind else w.sum(dim=0))
        return out

    q, kv = energy("q").view(t.q, t.dim), energy("kv").view(t.kv, t.dim)
    group = t.q // t.kv
    q_by_group = q.view(t.kv, group, t.dim)
    groups = top_channels(kv.sum(1) + q_by_group.sum((1, 2)), s.kv)
    q_rows, kv_rows = [], []
    for g in groups.tolist():
        dims = top_channels(kv[g] + q_by_group[g].sum(0), s.dim)
        kv_rows.append(g * t.dim + dims)
        for h in top_channels(q_by_group[g].sum(1), s.q // s.kv).tolist():
            q_rows.append((g * group + h) * t.dim + dims)
    return torch.cat(q_rows), torch.cat(kv_rows)
