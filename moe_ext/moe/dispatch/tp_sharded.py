"""Every expert on every rank, each sharded on its FFN dimension over ``groups.etp``.

# T tokens (identical on every etp rank), H hidden, k top-k, E experts, N = T*k rows

Each rank computes partial expert outputs from its F slice; their sum over the group is the
full output (the down projection is linear in the F slices). Backward, thought through:
- the summed output is consumed identically on every rank, so each rank already holds the
  full gradient of the sum: the all-reduce's backward is the identity;
- x and the routing weights are replicated, but each rank's backward only sees its own F
  slice, so their gradients through the experts are partial: they are all-reduced on the
  way back (``copy_to_partials``). Router and input gradients then match a single-rank
  computation on every rank.
"""

from __future__ import annotations

from moe_ext.moe.dispatch._permute import check_routing, unpermute_weighted_sum
from moe_ext.moe.dispatch.base import Dispatcher
from moe_ext.moe.dispatch.comm import copy_to_partials, reduce_partials
from moe_ext.moe.dispatch.local import LocalHandle, permute_local


class TPShardedDispatcher(Dispatcher):
    """Strategy ``tp_experts``: local permutation, then one all-reduce of [T, H] in combine."""

    splits_experts_over_ep = False

    @property
    def ffn_shards(self) -> int:
        return self.groups.etp_size

    @property
    def ffn_shard_rank(self) -> int:
        return self.groups.etp_rank

    def dispatch(self, x, weights, expert_idx):
        check_routing(x, weights, expert_idx)
        x = copy_to_partials(x, self.groups.etp)
        weights = copy_to_partials(weights, self.groups.etp)
        x_sorted, tokens_per_expert, order = permute_local(x, expert_idx, self.num_experts)
        return x_sorted, tokens_per_expert, LocalHandle(order, weights)

    def combine(self, y_local, handle: LocalHandle):
        partial = unpermute_weighted_sum(y_local, handle.order, handle.weights)  # [T, H]
        return reduce_partials(partial, self.groups.etp)
