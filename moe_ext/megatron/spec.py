"""Layer and decoder-block specs that put MoEExtLayer into Megatron-core's GPTModel.

megatron-core builds a TransformerLayer's ``mlp`` from its spec in two styles:
- 0.16.x: ``ModuleSpec(module=MoELayer, submodules=...)``, built with
  ``build_module(spec, config=...)``; TransformerLayer passes ``pg_collection`` only to
  Megatron's own MoE/expert classes, so our layer gets its groups from ``groups`` bound
  in the spec;
- 0.19.x: ``functools.partial(MoELayer, submodules=...)``, called with ``config=,
  pg_collection=, is_mtp_layer=, name=``.
The builders ask the installed megatron-core which style its own local spec uses and bind
MoEExtLayer the same way, then reuse Megatron's own layer/block spec functions with only the
MoE ``mlp`` slot replaced, so attention, norms and dense MLP layers stay Megatron's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Optional

from megatron.core.transformer.moe.moe_layer import BaseMoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from moe_ext.megatron.config import MegatronConfigError, moe_layer_kwargs
from moe_ext.megatron.layer import MoEExtLayer


def _gpt_specs():
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs


@functools.lru_cache(maxsize=1)
def megatron_spec_style() -> str:
    """'partial' (0.19.x) or 'module_spec' (0.16.x): how the installed megatron-core's own
    local GPT layer spec describes a MoE mlp."""
    mlp = (
        _gpt_specs().get_gpt_layer_local_spec(num_experts=2, moe_grouped_gemm=False).submodules.mlp
    )
    return "partial" if isinstance(mlp, functools.partial) else "module_spec"


def _mlp_class(mlp: Any) -> Any:
    if isinstance(mlp, functools.partial):
        return mlp.func
    return getattr(mlp, "module", mlp)


def is_moe_slot(mlp: Any) -> bool:
    """Whether a TransformerLayer ``mlp`` spec (either style) builds a Megatron MoE layer."""
    cls = _mlp_class(mlp)
    return isinstance(cls, type) and issubclass(cls, BaseMoELayer)


def moe_layer_spec(plan: Any, groups: Any = None, *, experts_backend: str = "auto") -> Any:
    """The ``mlp`` spec of a TransformerLayer that builds MoEExtLayer for ``plan``.

    plan: moe_ext ParallelPlan; groups: ProcessGroups built from it (needed with 0.16.x, whose
    TransformerLayer does not hand pg_collection to custom MLP classes; with 0.19.x the
    layer's pg_collection arrives from the model and must come from the same plan)."""
    params = dict(plan=plan, groups=groups, experts_backend=experts_backend)
    if megatron_spec_style() == "partial":
        return functools.partial(MoEExtLayer, **params)
    if groups is None:
        raise MegatronConfigError(
            "megatron-core 0.16.x does not pass pg_collection to custom MoE "
            "layers; give moe_layer_spec the moe_ext ProcessGroups "
            "(groups=ProcessGroups.build(plan, ...))"
        )
    return ModuleSpec(module=MoEExtLayer, params=params)


def _with_mlp(layer_spec: ModuleSpec, mlp: Any) -> ModuleSpec:
    """A copy of a TransformerLayer ModuleSpec with its ``mlp`` slot replaced."""
    new = copy.copy(layer_spec)
    new.submodules = dataclasses.replace(layer_spec.submodules, mlp=mlp)
    return new


def get_gpt_layer_spec(
    plan: Any,
    groups: Any = None,
    *,
    qk_layernorm: bool = False,
    normalization: str = "RMSNorm",
    use_transformer_engine: bool = False,
    experts_backend: str = "auto",
) -> ModuleSpec:
    """A GPT TransformerLayer spec whose MLP is MoEExtLayer (every layer MoE).

    Attention and norms come from Megatron's local spec (no Transformer Engine) or, with
    ``use_transformer_engine=True``, from its TE spec."""
    specs = _gpt_specs()
    if use_transformer_engine:
        base = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=2, moe_grouped_gemm=False, qk_layernorm=qk_layernorm
        )
    else:
        base = specs.get_gpt_layer_local_spec(
            num_experts=2,
            moe_grouped_gemm=False,
            qk_layernorm=qk_layernorm,
            normalization=normalization,
        )
    return _with_mlp(base, moe_layer_spec(plan, groups, experts_backend=experts_backend))


def get_gpt_decoder_block_spec(
    config: Any,
    plan: Any,
    groups: Any = None,
    *,
    use_transformer_engine: bool = False,
    normalization: Optional[str] = None,
    pp_rank: Optional[int] = None,
    vp_stage: Optional[int] = None,
    experts_backend: str = "auto",
) -> Any:
    """Megatron's GPT decoder-block spec for ``config`` (dense/MoE pattern from
    ``moe_layer_freq``, this pipeline stage's layers) with every MoE layer's MLP replaced
    by MoEExtLayer. The config's MoE fields are checked up front (MegatronConfigError).

    pp_rank: this rank's pipeline stage (default: from ``groups``, or 0 when plan.pp == 1)."""
    moe_layer_kwargs(config)  # refuse unsupported MoE settings before building anything
    if pp_rank is None:
        if groups is not None:
            pp_rank = groups.pp_rank
        elif plan.pp == 1:
            pp_rank = 0
        else:
            raise MegatronConfigError(
                "pipeline-parallel plan: pass groups= or pp_rank= so the "
                "block spec holds this stage's layers"
            )
    kwargs = dict(
        use_transformer_engine=use_transformer_engine,
        normalization=normalization or getattr(config, "normalization", None),
        pp_rank=pp_rank,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    block = _gpt_specs().get_gpt_decoder_block_spec(config, **kwargs)
    ours = moe_layer_spec(plan, groups, experts_backend=experts_backend)
    block = copy.copy(block)
    block.layer_specs = [
        _with_mlp(spec, ours) if is_moe_slot(spec.submodules.mlp) else spec
        for spec in block.layer_specs
    ]
    return block
