"""The ``--json`` contract: one JSON Schema per command (keyed by its full name), rendered into
``docs/cli.md`` and checked against real output by the tests. A new command adds one entry.

Every command prints exactly one JSON object on stdout; on failure that object is :data:`ERROR`.
"""

from __future__ import annotations

import typing
from typing import Any

from .settings_flags import ROUTER_FLAGS, STRATEGY_FLAGS, SettingsFlags

_INT, _NUM, _STR, _BOOL = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}
_OBJ, _NULL_STR = {"type": "object"}, {"type": ["string", "null"]}
_INTS = {"type": "array", "items": _INT}
_STRS = {"type": "array", "items": _STR}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": sorted(required), "properties": {**required, **(optional or {})}}


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def settings_schema(group: SettingsFlags, **extra: Any) -> dict[str, Any]:
    """The schema of a settings dict (``strategy_params`` / ``router``), generated from the settings classes:
    one property per setting (its JSON type, choices and help), nothing else allowed."""
    properties = dict(extra)
    for name, owners in group.fields().items():
        hint = typing.get_type_hints(group.registry[owners[0][0]])[name]
        types = [_JSON_TYPES[t] if t is not type(None) else "null" for t in (typing.get_args(hint) or (hint,))]
        prop: dict[str, Any] = {"type": types[0] if len(types) == 1 else types, "description": group.help(name)}
        choices = [c for _, f in owners for c in f.metadata.get("choices", ())]
        if choices:
            prop["enum"] = list(dict.fromkeys(choices))
        properties[name] = prop
    return {"type": "object", "properties": properties, "additionalProperties": False}


STRATEGY_PARAMS = settings_schema(STRATEGY_FLAGS)
ROUTER = settings_schema(ROUTER_FLAGS, type={"enum": list(ROUTER_FLAGS.registry)})
ERROR = _obj({"error": _STR, "exit_code": _INT}, {"report": _OBJ})

_ERROR_PAIR = _obj({"max_abs": _NUM, "relative": _NUM})
VERIFY_REPORT = _obj({
    "moe_dir": _STR, "against": _STR, "tol": _NUM, "inputs": _STR, "exact_expected": _BOOL, "passed": _BOOL,
    "layers": {"type": "object", "additionalProperties": _ERROR_PAIR}, "final": _ERROR_PAIR,
})
PLAN = _obj({
    "source": _STR, "family": _STR, "output_format": _STR, "architecture": _NULL_STR, "num_layers": _INT,
    "hidden_size": _INT, "intermediate_size": _INT, "moe_layers": _INTS, "num_experts": _INT, "top_k": _INT,
    "expert_width": _INT, "strategy": _STR, "strategy_params": STRATEGY_PARAMS, "router": ROUTER, "router_init": _STR,
    "seed": _INT, "params_total": _INT, "params_active": _INT, "tensors": _INT, "shards": _STRS,
    "bytes_to_write": _INT, "free_bytes": {"type": ["integer", "null"]}, "dropped_tensors": _STRS,
    "moe_tensors": {"type": "array", "items": _obj({"name": _STR, "shape": _INTS, "dtype": _STR})},
})
RECIPE_RECORD = {"type": ["object", "null"], "required": ["name", "sha256", "values", "overrides"],
                 "properties": {"name": _STR, "path": _STR, "sha256": _STR, "method": _STR, "paper": _STR,
                                "family": _STR, "values": _OBJ, "overrides": _OBJ}}
PUSH = _obj({
    "repo_id": _STR, "url": _STR, "revision": _NULL_STR, "private": _BOOL, "pr_url": _NULL_STR,
    "commits": {"type": "array", "minItems": 1,
                "items": _obj({"oid": _STR, "url": _STR, "message": _STR, "files": _STRS})},
})
_RECIPE_SUMMARY = _obj({"name": _STR, "method": _STR, "paper": _STR, "summary": _STR, "family": _STR,
                        "path": _STR, "missing": _STRS})

_NULL_NUM, _NULL_INT = {"type": ["number", "null"]}, {"type": ["integer", "null"]}
COMPARE = _obj({
    "source": _STR, "num_experts": _INT, "top_k": _INT, "moe_layers": _INTS, "calibration": _OBJ,
    "heldout_samples": _INT, "stats_seconds": _NUM,
    "rows": {"type": "array", "items": _obj({
        "strategy": _STR, "expert_width": _NULL_INT, "init_gap": _NULL_NUM, "overlap": _NULL_NUM,
        "coverage": _NULL_NUM, "seconds": _NULL_NUM, "error": _NULL_STR}, {"params": _OBJ})},
})
FINETUNE = _obj({
    "model_dir": _STR, "report_dir": _STR, "options": _OBJ, "settings": _OBJ, "data": _OBJ, "device": _OBJ,
    "runs": {"type": "array", "minItems": 1, "items": _obj({"name": _STR})}, "recovery": _OBJ,
    "wall_seconds": _NUM, "saved": _NULL_STR,
})

ROUTES = _obj({
    "model": _STR, "input": _STR, "modality": {"enum": ["image", "text"]}, "router": _STR, "tokens": _STRS,
    "grid": {"type": ["integer", "null"]}, "files": _STRS,
    "layers": {"type": "object", "additionalProperties": _obj(
        {"top_expert": _INTS, "load": _INTS, "dead_experts": _INTS})},
})

# issue 13: eval (one row per capacity factor and BPR setting, after a no-capacity row)
EVAL = _obj({
    "model": _STR, "task": _STR, "metric": {"enum": ["accuracy", "loss"]}, "higher_is_better": _BOOL,
    "router": _NULL_STR, "data": _OBJ, "options": _OBJ, "plot": _NULL_STR,
    "rows": {"type": "array", "minItems": 1, "items": _obj({
        "capacity_factor": _NULL_NUM, "bpr": {"type": ["boolean", "null"]}, "loss": _NUM, "accuracy": _NUM,
        "examples": _INT, "flops_per_example": _NUM, "expert_flops_per_example": _NULL_NUM,
        "kept_assignments": _NULL_NUM})},
})

SCHEMAS: dict[str, dict[str, Any]] = {
    "upcycle": {
        "$defs": {"plan": PLAN, "recipe": RECIPE_RECORD, "verify": VERIFY_REPORT, "push": PUSH},
        "oneOf": [
            _obj({"dry_run": {"const": True}, "plan": {"$ref": "#/$defs/plan"}},
                 {"recipe": {"$ref": "#/$defs/recipe"}, "options": _obj({}, {
                     "strategy_params": {"$ref": "#/$defs/plan/properties/strategy_params"},
                     "router": {"$ref": "#/$defs/plan/properties/router"}})}),
            _obj({"out": _STR, "seconds": _NUM, "plan": {"$ref": "#/$defs/plan"},
                  "files": {"type": "object", "additionalProperties": _STR},
                  "verify": {"oneOf": [{"type": "null"}, {"$ref": "#/$defs/verify"}]}},
                 {"recipe": {"$ref": "#/$defs/recipe"}, "push": {"$ref": "#/$defs/push"},
                  "warnings": _STRS}),  # issue 14: multi-source gate warnings
        ],
    },
    "verify": VERIFY_REPORT,
    "inspect": {"oneOf": [
        _obj({"aliases": {"type": "object", "additionalProperties": _STR}}),
        _obj({"source": _STR, "path": _STR, "model_type": _NULL_STR, "family": _NULL_STR, "is_moe": _BOOL,
              "num_layers": _INT, "params_total": _INT, "params_active": _INT, "tensors": _INT}),
    ]},
    "push": PUSH,
    "compare-strategies": COMPARE,
    "finetune": FINETUNE,
    "routes": ROUTES,
    "eval": EVAL,  # issue 13
    "recipes list": _obj({"recipes": {"type": "array", "items": _RECIPE_SUMMARY}}),
    "recipes show": {**_RECIPE_SUMMARY, "required": [*_RECIPE_SUMMARY["required"], "options", "sha256"],
                     "properties": {**_RECIPE_SUMMARY["properties"], "options": _OBJ, "sha256": _STR}},
}
