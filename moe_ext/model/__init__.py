"""Native MoE decoder (mixtral, qwen2_moe, qwen3_moe): model, generation, parallelization."""

from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.decoder import Transformer
from moe_ext.model.generate import GenerateError, GenerationResult, generate
from moe_ext.model.parallelize import (
    ParallelizeError,
    RankCoords,
    parallelize,
    shard_slices,
    stage_layers,
)
from moe_ext.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from moe_ext.model.weights import init_random_, init_random_full

__all__ = [
    "ByteTokenizer",
    "GenerateError",
    "GenerationResult",
    "HFTokenizer",
    "ModelArgs",
    "ModelArgsError",
    "ParallelizeError",
    "RankCoords",
    "Transformer",
    "generate",
    "init_random_",
    "init_random_full",
    "load_tokenizer",
    "parallelize",
    "shard_slices",
    "stage_layers",
]
