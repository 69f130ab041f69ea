"""Reading dense checkpoints (``source``) and writing MoE checkpoints (``writer``)."""
