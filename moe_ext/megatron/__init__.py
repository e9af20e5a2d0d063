"""Megatron-core integration: moe_ext's MoE layer, plan-chosen dispatch and groups inside
GPTModel (works without Transformer Engine; megatron-core 0.16.x and 0.19.x).

Typical use (every rank, after torch.distributed is up)::

    plan = build_plan(...); groups = ProcessGroups.build(plan, "nccl", timeout)
    install_parallel_state(groups); seed_model_parallel_rng(groups, seed=1234)
    config = TransformerConfig(**transformer_config_kwargs(args, plan))
    spec = get_gpt_decoder_block_spec(config, plan, groups)
    model = GPTModel(config, spec, pg_collection=pg_collection(groups), **gpt_model_kwargs(args))
    load_into_megatron(model, native_to_megatron(full_state, args, plan, groups))
"""

from moe_ext.megatron.config import (
    MegatronConfigError,
    check_supported,
    gpt_model_kwargs,
    loss_coeffs,
    moe_layer_kwargs,
    router_kwargs,
    transformer_config_kwargs,
)
from moe_ext.megatron.layer import MoEExtLayer
from moe_ext.megatron.spec import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    is_moe_slot,
    megatron_spec_style,
    moe_layer_spec,
)
from moe_ext.megatron.state import (
    ParallelStateError,
    install_parallel_state,
    pg_collection,
    seed_model_parallel_rng,
    uninstall_parallel_state,
)
from moe_ext.megatron.weights import (
    load_into_megatron,
    megatron_expert_state,
    megatron_to_native,
    native_to_megatron,
)

__all__ = [
    "MegatronConfigError",
    "MoEExtLayer",
    "ParallelStateError",
    "check_supported",
    "get_gpt_decoder_block_spec",
    "get_gpt_layer_spec",
    "gpt_model_kwargs",
    "install_parallel_state",
    "is_moe_slot",
    "load_into_megatron",
    "loss_coeffs",
    "megatron_expert_state",
    "megatron_spec_style",
    "megatron_to_native",
    "moe_layer_kwargs",
    "moe_layer_spec",
    "native_to_megatron",
    "pg_collection",
    "router_kwargs",
    "seed_model_parallel_rng",
    "transformer_config_kwargs",
    "uninstall_parallel_state",
]
