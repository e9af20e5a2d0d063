"""Native MoE decoder (mixtral, qwen2_moe, qwen3_moe): model, generation, parallelization."""
from moe_ext.model.args import ModelArgs, ModelArgsError
from moe_ext.model.decoder import Transformer
from moe_ext.model.generate import GenerationResult, generate

__all__ = ["GenerationResult", "ModelArgs", "ModelArgsError", "Transformer", "generate"]
