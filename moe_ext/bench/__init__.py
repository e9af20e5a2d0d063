"""Benchmark helpers shared by tools/bench_*.py: other implementations run as peers on the
same shapes (``peers``)."""

from moe_ext.bench.peers import (
    PEER_STRATEGIES,
    PEERS,
    DeepSpeedMoEPeer,
    MegatronMoEPeer,
    PeerUnavailable,
    SwiGLUExpert,
    build_peer,
    deepspeed_peer,
    ep_plan,
    hf_causal_lm,
    hf_decode_floor_s,
    hf_generate_timed,
    library_versions,
    megatron_moe_config,
    megatron_moe_layer,
    megatron_peer,
    peer_strategies,
)

__all__ = [
    "PEER_STRATEGIES",
    "PEERS",
    "DeepSpeedMoEPeer",
    "MegatronMoEPeer",
    "PeerUnavailable",
    "SwiGLUExpert",
    "build_peer",
    "deepspeed_peer",
    "ep_plan",
    "hf_causal_lm",
    "hf_decode_floor_s",
    "hf_generate_timed",
    "library_versions",
    "megatron_moe_config",
    "megatron_moe_layer",
    "megatron_peer",
    "peer_strategies",
]
