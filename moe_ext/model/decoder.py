"""The native decoder: embeddings, decoder blocks (attention + MoE or dense MLP), final norm,
LM head. Free of parallelism: ``parallelize`` (parallelize.py) shards it in place and sets
the process groups the forward pass uses; unset groups mean a single rank.

# B batch, S query length, T = B·S tokens, H hidden, V vocab

Parameter names are the moe_ext checkpoint names (docs/ARCHITECTURE.md). ``layers`` is a
ModuleDict keyed by the global layer index, so a pipeline stage that keeps only its own
layers still names them ``layers.{i}``.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from moe_ext.model.args import ModelArgs
from moe_ext.model.context import DecodeState, ParallelContext
from moe_ext.model.layers import RMSNorm
from moe_ext.moe.dispatch.comm import run_on_token_slice
from moe_ext.moe.dispatch.static import routed_replicas, routed_replicated
from moe_ext.moe.layer import add_shared_expert, routed_output
from moe_ext.quant.linear import dense_linear, quantize_modules_


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = args.is_moe_layer(layer_id)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        family = args.family
        self.self_attn = family.build_attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = family.build_moe(args) if self.is_moe else family.build_dense_mlp(args, layer_id)
        # ep_* with tp > 1: the TP ranks hold identical tokens; each sends only its 1/tp
        # slice through the expert exchange and the slices are all-gathered afterwards
        # (or, when the EP group is exactly this group, no exchange: routed_replicated).
        self.moe_token_split_group: Optional[dist.ProcessGroup] = None
        # (group, dispatcher, _exchange_mode's answer for them): learnt on the first eager
        # forward, so compiled decode steps read it as a constant
        self._split_mode: Optional[tuple] = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        kv_start: torch.Tensor,
        kv_len: Optional[int] = None,
        use_cache: bool = False,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: [B, S, H] -> [B, S, H]; the attention arguments as ``Transformer.forward``."""
        h = x + self.self_attn(
            self.input_layernorm(x), cos, sin, slots, kv_start, kv_len, use_cache, cache_rows
        )
        return h + self.feed_forward(self.post_attention_layernorm(h))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, H] (or [0, H] on an idle rank) -> same shape."""
        group = self.moe_token_split_group
        if group is None:
            return self.mlp(x)
        return split_tokens_forward(self.mlp, x, group, self._exchange_mode(group))

    def _exchange_mode(self, group: dist.ProcessGroup) -> str:
        """How this MoE layer's tokens, identical over the token-split (TP) ``group``, reach
        the experts (split_tokens_forward): "replicated" when the EP group is exactly
        ``group``, "replicas" when it is whole TP groups in order (agreed over the EP group
        by one all-reduce, the first time), else "split"."""
        dispatcher = self.mlp.dispatcher
        known = self._split_mode
        if known is None or known[0] is not group or known[1] is not dispatcher:
            mode = _exchange_mode(dispatcher, group, self.post_attention_layernorm.weight.device)
            known = self._split_mode = (group, dispatcher, mode)
        return known[2]

    def idle_forward(self, hidden_size: int, dtype: torch.dtype, device) -> None:
        """Join this layer's expert exchange with zero tokens (a data-parallel rank whose
        sequences are all done while its expert-parallel peers still decode)."""
        if self.is_moe:
            self.feed_forward(torch.empty(0, hidden_size, dtype=dtype, device=device))


@torch.compiler.disable
def _exchange_mode(dispatcher, group: dist.ProcessGroup, device: torch.device) -> str:
    """TransformerBlock._exchange_mode's answer, worked out (eagerly, once per layer)."""
    if getattr(dispatcher, "replicates_over", None) is None:
        return "split"
    if dispatcher.replicates_over(group):
        return "replicated"
    flag = torch.tensor([int(dispatcher.gathers_replicas(group))])
    if dist.get_backend(dispatcher.groups.ep) != dist.Backend.GLOO:
        flag = flag.to(device)
    # every EP rank must take the same path (they make its collectives)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dispatcher.groups.ep)
    return "replicas" if int(flag.item()) else "split"  # sync: once per layer


def split_tokens_forward(
    mlp: nn.Module, x: torch.Tensor, group: dist.ProcessGroup, mode: str = "split"
) -> torch.Tensor:
    """A MoELayer over TP-identical tokens: every TP rank routes all of them (identically)
    and runs the shared expert on all of them, but sends only its 1/tp slice (tokens with
    their routing) through the expert exchange and all-gathers the results
    (``run_on_token_slice``, as the Megatron layer does: zero-padded to a multiple of tp,
    differentiable; T = 0 is an idle lockstep step of the whole TP group, only the exchange
    runs). Routing whole keeps training exact: the TP-replicated router and shared expert
    see every token on every rank (full, identical gradients) and the load-balancing loss
    is the one of all tokens.

    ``mode`` (``TransformerBlock._exchange_mode``): "replicated" when the dispatcher's EP
    group is exactly ``group`` (ep = tp, one replica), so every EP rank already holds every
    token: each runs its own experts on the rows routed to them and one all-reduce sums
    the outputs (``static.routed_replicated``), in place of the slice, the exchange's
    all-gather and reduce-scatter, and the gather of the slices: one collective per layer
    instead of three. "replicas" when the EP group is whole TP groups (ep = tp·dp): in
    decode (static capacity, no autograd) the combine's reduce-scatter hands every rank
    its whole replica's tokens (``static.routed_replicas``): two collectives instead of
    three. "split": the general path above.

    x: [..., H] -> same shape."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])  # [T, H]
    routing = mlp.router(tokens)  # weights [T, k] f32, expert_idx [T, k]
    rows = (tokens, routing.weights, routing.expert_idx)
    if mode == "replicated":
        y = routed_replicated(mlp.dispatcher, mlp.experts, *rows)  # [T, H]
    elif (
        mode == "replicas"
        and mlp.dispatcher.max_tokens_per_rank is not None
        and not torch.is_grad_enabled()
    ):
        y = routed_replicas(mlp.dispatcher, mlp.experts, *rows, group)  # [T, H]
    else:
        routed = partial(routed_output, mlp.dispatcher, mlp.experts)
        y = run_on_token_slice(routed, rows, group)  # [T, H]
    y = add_shared_expert(y, tokens, mlp.shared_expert, mlp.shared_expert_gate)
    mlp.aux_loss, mlp.z_loss = routing.aux_loss, routing.z_loss
    return y.reshape(shape)


def _decode_block(
    block: TransformerBlock,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    kv_start: Optional[torch.Tensor],
    cache_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One block of the static decode step (the function ``compile_decode`` compiles).
    h: [B, 1, H]; cos/sin: [B, 1, D]; slots: [1] or [B, 1] (per row); kv_start: [B];
    cache_rows: [B] or None (rows 0..B-1, the CUDA-graph case)."""
    return block(h, cos, sin, slots, kv_start, None, True, cache_rows)


def checkpointed_block(
    block: TransformerBlock,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    kv_start: torch.Tensor,
) -> torch.Tensor:
    """``block`` (training, no cache) keeping only its input: backward runs its forward
    again (non-reentrant ``torch.utils.checkpoint``), collectives included. Early stop is
    off so the recomputation always runs the whole block: every rank then makes the same
    expert exchanges in the same order. h: [B, S, H] -> [B, S, H]."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        return torch.utils.checkpoint.checkpoint(
            block, h, cos, sin, slots, kv_start, None, False, use_reentrant=False
        )


class Transformer(nn.Module):
    """Full model on any device (``meta`` included); ``parallelize`` shards it in place."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens: Optional[nn.Embedding] = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(args, i) for i in range(args.num_hidden_layers)}
        )
        self.norm: Optional[RMSNorm] = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head: Optional[nn.Linear] = (
            None
            if args.tie_word_embeddings
            else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        )
        self.rotary = args.family.build_rotary(args)
        quantize_modules_(self, args)  # quantized weights: their storage, as checkpoints hold it
        # this rank's place in the parallel plan: one rank with everything until
        # parallelize sets it (the only place that does)
        self.context: ParallelContext = ParallelContext()
        self.decode_state: DecodeState = DecodeState()  # generate()'s memory across calls
        self.cache_batch_slots: Optional[tuple[int, int]] = None  # set by setup_caches
        # set by compile_decode: the decode step's block function under torch.compile
        self.compiled_decode_block = None
        # training: recompute each block's activations in backward (torch.utils.checkpoint)
        # instead of keeping them; set from train.activation_checkpointing
        self.activation_checkpointing: bool = False

    # ---- placement facts ---------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.context.is_first_stage

    @property
    def is_last_stage(self) -> bool:
        return self.context.is_last_stage

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return (
            self.layers[next(iter(self.layers))].input_layernorm.weight.dtype
            if len(self.layers)
            else next(iter(self.parameters())).dtype
        )

    # ---- KV cache ------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_slots: int, dtype: Optional[torch.dtype] = None) -> None:
        """Preallocate every local layer's attention cache for ``batch`` sequences of up to
        ``max_slots`` slots (each attention kind owns its cache layout)."""
        for block in self.layers.values():
            block.self_attn.setup_cache(batch, max_slots, dtype or self.dtype, self.device)
        self.cache_batch_slots = (batch, max_slots)

    def compile_decode(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run decode steps (one query slot over the whole KV cache) through
        ``torch.compile`` of one decoder block. Every block shares the compiled code
        (parameters and caches are graph inputs, so the 48 layers of a model compile once
        per batch size); collectives stay eager (graph breaks). Decode at batch 1 is
        otherwise dozens of tiny kernels per layer (norms, RoPE, masks, routing) that
        inductor fuses; the CUDA graph of generate() then captures the compiled step.
        ``enabled=False`` returns to eager decode."""
        if not enabled:
            self.compiled_decode_block = None
        elif self.compiled_decode_block is None:
            self.compiled_decode_block = torch.compile(
                _decode_block, backend=backend, dynamic=False
            )

    @property
    def cache_shape(self) -> Optional[tuple[int, int]]:
        """(batch, max_slots) of the current caches, None without caches."""
        return self.cache_batch_slots

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        slots: Optional[torch.Tensor] = None,
        kv_start: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        last_only: bool = False,
        use_cache: bool = False,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """tokens: [B, S] int64 (used for shapes only after the first stage); slots: [S]
        int64 cache slots shared by every row (default 0..S-1), or [B, S] int64, each row's
        own consecutive slots (rotary positions slots - kv_start; row b's query at slot s
        sees keys at slots kv_start[b]..s of its cache row); kv_start: [B] first real slot
        per sequence (default None: no left padding, i.e. 0); use_cache: read/write the KV
        caches (setup_caches); kv_len: attend to cache slots [0, kv_len) (None: all slots,
        the static decode shape); last_only: logits of the last slot only; cache_rows: [B]
        int64 distinct cache rows the batch rows read and write (None: rows 0..B-1, a view
        of the caches' first B rows, which CUDA graphs need).

        Returns logits [B, S or 1, V] in the model dtype on the last pipeline stage, None on
        the others (their hidden states went to the next stage)."""
        B, S = tokens.shape
        device = tokens.device
        if slots is None:
            slots = torch.arange(S, device=device)
        elif slots.dim() == 2 and tuple(slots.shape) != (B, S):
            raise ValueError(f"per-row slots {tuple(slots.shape)} must be [B, S] = {(B, S)}")
        if self.is_first_stage:
            h = self.embed_tokens(tokens)  # [B, S, H]
        else:
            h = torch.empty(B, S, self.args.hidden_size, dtype=self.dtype, device=device)
            dist.recv(h, src=self.context.pp_prev)  # hidden states of the previous stage
        h = self._layers(h, slots, kv_start, kv_len, use_cache, cache_rows)
        if not self.is_last_stage:
            dist.send(h.contiguous(), dst=self.context.pp_next)
            return None
        if last_only:
            h = h[:, -1:]  # [B, 1, H]
        return self._logits(h)

    def stage_forward(
        self,
        tokens: Optional[torch.Tensor],
        hidden: Optional[torch.Tensor] = None,
        slots: Optional[torch.Tensor] = None,
        kv_start: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        use_cache: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor:
        """This pipeline stage's part of a forward, without any stage-to-stage traffic: the
        pipeline schedules (moe_ext.train.pipeline for training, pipeline_generate for
        generation) move ``hidden`` between stages themselves. The defaults are a training
        forward (no cache, no padding).

        tokens: [B, S] int64 (read by the first stage only); hidden: [B, S, H] in the model
        dtype, the previous stage's output (None on the first stage); slots, kv_start,
        kv_len, use_cache, last_only: as ``forward`` (slots default 0..S-1). Returns logits
        [B, S or 1, V] on the last stage, else this stage's hidden states [B, S, H]."""
        h = self.embed_tokens(tokens) if self.is_first_stage else hidden  # [B, S, H]
        if slots is None:
            slots = torch.arange(h.shape[1], device=h.device)
        h = self._layers(h, slots, kv_start, kv_len, use_cache)
        if not self.is_last_stage:
            return h
        return self._logits(h[:, -1:] if last_only else h)  # [B, S or 1, V]

    def _layers(
        self,
        h: torch.Tensor,
        slots: torch.Tensor,
        kv_start: Optional[torch.Tensor],
        kv_len: Optional[int],
        use_cache: bool,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """This stage's blocks. h: [B, S, H] -> [B, S, H]; slots: [S] or [B, S]; kv_start
        None: no left padding."""
        B, S = h.shape[:2]
        positions = slots.expand(B, S)  # [B, S]: shared slots broadcast, per-row as given
        if kv_start is not None:
            positions = (positions - kv_start[:, None]).clamp(min=0)  # [B, S]
        cos, sin = self.rotary(positions, h.dtype)
        # the static decode step (one new slot, whole cache) runs each block compiled
        compiled = self.compiled_decode_block if (S == 1 and use_cache and kv_len is None) else None
        recompute = (
            self.activation_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and not use_cache
        )
        for block in self.layers.values():
            if compiled is not None:
                h = compiled(block, h, cos, sin, slots, kv_start, cache_rows)
            elif recompute:
                h = checkpointed_block(block, h, cos, sin, slots, kv_start)
            else:
                h = block(h, cos, sin, slots, kv_start, kv_len, use_cache, cache_rows)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (last stage). h: [B, S, H] -> logits [B, S, V]."""
        h = self.norm(h)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return dense_linear(h, weight)  # [B, S, V]

    def idle_forward(self) -> None:
        """One step with no tokens: join every local MoE layer's expert exchange (see
        TransformerBlock.idle_forward). Whole pipeline replicas go idle together, so there
        is no stage-to-stage traffic."""
        for block in self.layers.values():
            block.idle_forward(self.args.hidden_size, self.dtype, self.device)

    def set_moe_overlap(self, microbatches: int, min_tokens: int = 1024) -> None:
        """Dual-batch overlap in every local MoE layer (``Dispatcher.set_overlap``): each
        splits its tokens into ``microbatches`` parts whose exchanges run under the other
        parts' experts (1: off). Under a static capacity C only when ceil(C/microbatches)
        >= ``min_tokens``: decode and small prefill chunks keep one exchange, large prefill
        chunks and training (dynamic) split. The default follows the 2x H200 P2P-off layer
        bench (docs/PERF.md): overlap made a mixtral layer 1.7x slower at 16 tokens per
        rank (each part pays the collectives' latency) and gained at most 1-16% at 4096.
        Expert-parallel dispatchers only; every rank of an EP group must pass the same
        values."""
        for block in self.layers.values():
            if block.is_moe:
                block.mlp.dispatcher.set_overlap(microbatches, min_tokens)

    def set_moe_capacity(self, max_tokens_per_rank: Optional[int]) -> None:
        """Static expert-exchange capacity of every local MoE layer (Dispatcher.set_capacity);
        None restores the dynamic exchange.

        ``max_tokens_per_rank``: the most tokens (B·S) any rank of an expert-parallel group
        feeds a MoE layer in the steps to come; every rank of the group must pass the same
        value. With the tp token split (``moe_token_split_group``) a dispatcher sees only its
        ceil(n/tp) slice, so that is its capacity. Dispatchers without a routing-dependent
        exchange (replicate, tp_experts) ignore it."""
        for block in self.layers.values():
            if not block.is_moe:
                continue
            per_rank = max_tokens_per_rank
            if per_rank is not None and block.moe_token_split_group is not None:
                per_rank = -(-per_rank // dist.get_world_size(block.moe_token_split_group))
            block.mlp.dispatcher.set_capacity(per_rank)
