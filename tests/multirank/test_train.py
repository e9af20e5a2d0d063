"""Training on one spawned rank: the loss goes down on the shipped corpus (DeepSpeed engine,
the native model, 60 steps)."""

from __future__ import annotations

import os

import torch

from moe_ext.model import ByteTokenizer
from moe_ext.train.config import TrainLoopConf
from moe_ext.train.data import TokenData
from tests.support import deepspeed_test_engine, plan_of, run_ranks, sharded_random_model, tiny_args


def _loss_body(rank, world):
    os.environ["LOCAL_RANK"] = str(rank)
    from datetime import timedelta

    from moe_ext.groups import ProcessGroups
    from moe_ext.train.loop import RunState, Trainer

    torch.set_num_threads(2)
    args = tiny_args()
    plan = plan_of("replicate", world=1)
    groups = ProcessGroups.build(plan, "gloo", timedelta(seconds=60))
    model, _ = sharded_random_model(args, plan, groups)
    conf = TrainLoopConf(
        steps=60, lr=1e-2, warmup_steps=5, micro_batch=8, seq_len=64, eval_every=30, eval_batches=2
    )
    engine = deepspeed_test_engine(
        model,
        groups,
        lr=conf.lr,
        micro_batch=conf.micro_batch,
        zero_stage=0,
        grad_clip=conf.grad_clip,
        aux_loss_coeff=conf.aux_loss_coeff,
    )
    data = TokenData.load(None, ByteTokenizer(), args.vocab_size, conf.seq_len, 0.05)
    state = Trainer(engine, groups, data, conf, torch.device("cpu"), own_clipping=False).run(
        RunState()
    )
    lm = [h["lm_loss"] for h in state.history]
    first, last = lm[0], sum(lm[-5:]) / 5
    assert first > 5.0, first  # ~ln(260) at random init
    # a uniform guess over the ~65 byte values in use costs ln(65) = 4.2; the unigram
    # entropy of English text is ~3.0; 60 steps get to ~2.6
    assert last < 2.9 and last < first - 2.5, (first, last)
    assert [e["step"] for e in state.evals] == [30, 60]
    assert state.evals[1]["val_loss"] < state.evals[0]["val_loss"] < first
    aux = [h["aux_loss"] for h in state.history]
    assert all(a > 0 for a in aux)  # the routers' loss is part of the objective


def test_loss_decreases_on_shipped_corpus():
    run_ranks(_loss_body, world_size=1)
