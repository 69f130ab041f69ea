"""Configuration of BERT-MoE (``model_type: bert_moe``): BertConfig plus the MoE fields.

Bundled with :mod:`.moe_config` inlined into every bert_moe output directory
(``configuration_bert_moe.py``, the ``AutoConfig`` entry of its ``auto_map``); imports only transformers.
"""

from __future__ import annotations

from transformers import BertConfig

from .moe_config import MoEConfigFields


class BertMoEConfig(MoEConfigFields, BertConfig):
    """BertConfig plus the MoE layout (:class:`MoEConfigFields`)."""

    model_type = "bert_moe"
