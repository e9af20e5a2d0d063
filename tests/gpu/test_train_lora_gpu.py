"""LoRA on GPUs (run by the lead: ``python -m pytest tests/gpu/test_train_lora_gpu.py -m gpu``):

1. the grouped low-rank expert path on CUDA bf16 (torch's grouped_mm, rank 8 so the
   adapters' rows are 16-byte aligned) equals the per-expert loop and the fp32 experts
   with merged weights: outputs within 1e-2 and adapter gradients within 2e-2 relative
   (Frobenius) error, bf16 rounding;
2. launch/train.py fine-tunes the tiny model with LoRA on 2 GPUs (ep_nccl, ZeRO 1, bf16):
   every rank logs its trainable/frozen parameters and peak GPU memory, the loss stays
   finite, and the PEFT adapters and the merged model are written.

# T rows, H hidden, F expert FFN, E experts, r rank
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import REPO, run_launcher

pytestmark = pytest.mark.gpu


def test_grouped_low_rank_experts_on_cuda_bf16():
    from moe_ext.moe.experts import GroupedExperts

    torch.manual_seed(0)
    E, H, F_, r, T = 8, 128, 64, 8, 300
    fp32 = GroupedExperts(E, H, F_, backend="loop", device="cuda")
    lora = fp32.add_lora(r, alpha=16.0, dtype=torch.float32)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.1)
    merged = GroupedExperts(E, H, F_, backend="loop", device="cuda")
    with torch.no_grad():
        merged.gate_up_proj.copy_(fp32.gate_up_proj + lora.delta("gate_up_proj"))
        merged.down_proj.copy_(fp32.down_proj + lora.delta("down_proj"))
    counts = torch.tensor([40, 0, 70, 30, 10, 50, 60, 40], device="cuda")  # [E], sums to T
    x = torch.randn(T, H, device="cuda")
    reference = merged(x, counts)  # [T, H] fp32
    grads = {}
    for backend in ("grouped_mm", "loop"):
        experts = GroupedExperts(E, H, F_, backend=backend, device="cuda")
        experts.load_state_dict(fp32.state_dict(), strict=False)
        experts.add_lora(r, alpha=16.0, dtype=torch.float32)
        experts.lora.load_state_dict(lora.state_dict())
        experts = experts.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        if backend == "grouped_mm":
            assert experts.uses_grouped_mm(xb), "bf16 rank-8 adapters must take grouped_mm"
        y = experts(xb, counts)  # [T, H] bf16
        error = (y.float() - reference).norm() / reference.norm()
        assert error < 1e-2, (backend, error)  # bf16 rounding of x, weights and outputs
        y.float().square().sum().backward()
        grads[backend] = {n: p.grad.float() for n, p in experts.lora.named_parameters()}
    for name, grad in grads["grouped_mm"].items():
        want = grads["loop"][name]
        assert (grad - want).norm() / want.norm() < 2e-2, name


@pytest.mark.multirank
def test_launcher_lora_bf16_zero1_ep2(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "run"
    result = run_launcher(
        REPO / "launch/train.py",
        [
            f"hydra.run.dir={out}",
            "strategy.name=ep_nccl",
            "device=cuda",
            "dtype=bf16",
            "progress=false",
            "train.steps=5",
            "train.warmup_steps=1",
            "train.micro_batch=4",
            "train.seq_len=64",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.save_every=0",
            "train.zero_stage=1",
            "train.grad_clip=0",
            "train.lora.rank=8",
            "sample.max_new_tokens=8",
        ],
        nproc=2,
        env={"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    text = result.stdout + result.stderr
    for rank in (0, 1):
        assert f"rank {rank}: LoRA:" in text and "peak GPU memory" in text, text[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    losses = [h["loss"] for h in log["history"]]
    assert len(losses) == 5 and all(0 < x < 10 for x in losses), losses
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "model" / "config.json").is_file()
