"""DeepSpeed glue: expert parameters marked and grouped for DeepSpeed's MoE support, our
process groups registered as DeepSpeed's, and the engine around the causal-LM loss."""

from moe_ext.deepspeed.engine import (
    CausalLMWithAux,
    DeepSpeedSetupError,
    build_engine,
    deepspeed_config,
    install_exact_norm,
    load_optimizer_state,
    mark_expert_params,
    optimizer_param_groups,
    set_lr,
)

__all__ = [
    "CausalLMWithAux",
    "DeepSpeedSetupError",
    "build_engine",
    "deepspeed_config",
    "install_exact_norm",
    "load_optimizer_state",
    "mark_expert_params",
    "optimizer_param_groups",
    "set_lr",
]
