"""Checkpoints: Hugging Face name maps per family, the moe_ext directory format, lazy
slice-exact reading (``CheckpointReader``, ``ShardRequest``, ``load_sharded``) and
HF <-> moe_ext conversion (``tools/convert_checkpoint.py``)."""

from moe_ext.checkpoint.errors import CheckpointError
from moe_ext.checkpoint.reader import CheckpointReader, load_sharded
from moe_ext.checkpoint.shard import ShardRequest

__all__ = ["CheckpointError", "CheckpointReader", "ShardRequest", "load_sharded"]
