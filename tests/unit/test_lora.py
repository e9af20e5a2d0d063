"""LoRA (single process): the adapted model equals the base at init, the grouped expert
adapters equal experts with merged weights (loop and grouped_mm), a training step changes
only the adapters, the merged model and its moe_ext export give the adapted logits, the PEFT
export loads in ``peft`` onto the transformers model with the same logits, an FP8 base
trains, and bad settings are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from moe_ext.model import Transformer
from moe_ext.model.weights import init_random_full
from moe_ext.moe.experts import GroupedExperts
from moe_ext.train.lora import (
    LoraConf,
    LoraError,
    adapter_base_name,
    apply_lora,
    check_lora,
    merge_lora_,
)
from tests.support import plan_of, tiny_args

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]


def _model(args=None):
    args = args or tiny_args()
    model = Transformer(args)
    model.load_state_dict(init_random_full(args))
    return model.eval()


def _ids(vocab=256, rows=2, length=12, seed=3):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _randomize_b(model, seed=5):
    """Non-zero B matrices (at init they are zero): the adapters then change outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_adapted_model_equals_base_at_init_and_freezes_the_base():
    base = _model()
    model = _model()
    summary = apply_lora(model, LoraConf(rank=4, alpha=8, targets=TARGETS))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    layers = model.args.num_hidden_layers
    assert len(summary.adapted) == 5 * layers
    assert summary.trainable == sum(model.get_parameter(n).numel() for n in trainable)
    assert "trainable" in summary.describe()
    assert (
        adapter_base_name("layers.1.self_attn.q_proj.lora.A") == "layers.1.self_attn.q_proj.weight"
    )
    assert adapter_base_name("layers.1.mlp.experts.lora.down_B") == "layers.1.mlp.experts.down_proj"
    assert adapter_base_name("layers.1.mlp.experts.gate_up_proj") is None


@pytest.mark.parametrize(
    "backend, r", [("loop", 4), ("grouped_mm", 4), ("grouped_mm", 3)]
)  # r=3: fp32 adapter rows of 12 bytes take the per-expert fallback beside grouped_mm
def test_grouped_expert_adapters_equal_merged_experts(backend, r):
    torch.manual_seed(0)
    E, H, F_ = 4, 32, 16
    experts = GroupedExperts(E, H, F_, backend=backend)
    lora = experts.add_lora(r, alpha=8.0, dtype=torch.float32)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.2)
    if backend == "grouped_mm" and not experts.uses_grouped_mm(torch.zeros(1, H)):
        pytest.skip("torch's grouped_mm does not run here")
    merged = GroupedExperts(E, H, F_, backend="loop")
    with torch.no_grad():
        merged.gate_up_proj.copy_(experts.gate_up_proj + lora.delta("gate_up_proj"))
        merged.down_proj.copy_(experts.down_proj + lora.delta("down_proj"))
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, H, requires_grad=True)
    y = experts(x, counts)
    torch.testing.assert_close(y, merged(x, counts), rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    assert lora.gate_up_A.grad is not None and lora.down_B.grad.abs().sum() > 0
    assert lora.gate_up_B.grad[1].abs().sum() == 0  # expert 1 got no rows


def test_training_step_changes_only_adapters_and_merge_keeps_logits(tmp_path):
    from moe_ext.checkpoint.reader import CheckpointReader
    from moe_ext.deepspeed.engine import CausalLMWithAux
    from moe_ext.train.export import export_moe_ext, hf_config

    model = _model()
    apply_lora(model, LoraConf(rank=4, alpha=8, targets=TARGETS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = CausalLMWithAux(model, 0.01).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = wrapped(_ids(rows=2, length=17, seed=step))[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, param in model.named_parameters():
        if ".lora." in name:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
            assert param.grad is None
    model.eval()
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora_(model)
        assert not any(".lora." in n for n, _ in model.named_parameters())
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    export_moe_ext(
        model, plan_of("replicate", world=1), 0, str(tmp_path / "m"), hf_config(model.args, "byte")
    )
    reloaded = Transformer(model.args)
    with CheckpointReader.open(tmp_path / "m") as reader:
        reloaded.load_state_dict({n: reader.read(n) for n in reader.names()})
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids), adapted, rtol=1e-5, atol=1e-5)


def _hf(family):
    from tests.support import MINIMAX_VARIANTS, hf_model, minimax_hf_model

    if family == "minimax_m2":
        return minimax_hf_model(next(iter(MINIMAX_VARIANTS))).eval()
    return hf_model(family)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "minimax_m2"])
def test_peft_export_loads_onto_the_transformers_model(family, tmp_path):
    """Every adaptable module (attention, dense and shared-expert MLPs, experts)."""
    peft = pytest.importorskip("peft")
    from moe_ext.train.export import PEFT_EXPERT_FAMILIES, export_peft
    from moe_ext.train.lora import adaptable_modules
    from tests.support import native_from_dir

    assert family in PEFT_EXPERT_FAMILIES
    hf = _hf(family)
    hf.save_pretrained(tmp_path / "base")
    model = native_from_dir(tmp_path / "base")
    conf = LoraConf(rank=4, alpha=8, targets=sorted(adaptable_modules(model.args)))
    apply_lora(model, conf)
    _randomize_b(model)
    export_peft(model, plan_of("replicate", world=1), 0, str(tmp_path / "adapter"), conf)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    ids = _ids(vocab=min(64, model.args.vocab_size))
    with torch.no_grad():
        ours = model(ids)
        base = hf(ids).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
        theirs = peft_model(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_peft_export_refuses_experts_transformers_lays_out_otherwise():
    from moe_ext.train.export import ExportError, export_peft

    args = _family("gpt_oss")  # transformers' gpt_oss experts: interleaved, [E, H, 2F]
    model = _model(args)
    conf = LoraConf(rank=4, targets=["q_proj", "experts"])
    apply_lora(model, conf)
    with pytest.raises(ExportError, match="export the merged model"):
        export_peft(model, plan_of("replicate", world=1), 0, "/nonexistent/adapter", conf)


def test_fp8_base_trains_its_adapters():
    from moe_ext.deepspeed.engine import CausalLMWithAux
    from moe_ext.quant.config import QuantConfig
    from moe_ext.quant.linear import Fp8Linear

    args = tiny_args()
    args.quantization = QuantConfig("fp8", weight_block_size=(16, 16))
    model = Transformer(args)  # weights zero: the adapters carry the gradient
    apply_lora(model, LoraConf(rank=2, alpha=4, targets=["q_proj", "o_proj", "experts"]))
    assert isinstance(model.layers["0"].self_attn.q_proj, Fp8Linear)
    _randomize_b(model)
    loss = CausalLMWithAux(model, 0.0)(_ids(rows=1, length=9))[0]
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora." in n]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    with pytest.raises(LoraError, match="quantized"):
        merge_lora_(model)


def test_bad_settings_are_refused_in_one_line():
    args = tiny_args()
    plan = plan_of("replicate", world=1)
    check_lora(LoraConf(rank=0, targets=["nope"]), args, plan, 0)  # off: nothing checked
    with pytest.raises(LoraError, match="'nope' names no adaptable module"):
        check_lora(LoraConf(rank=4, targets=["q_proj", "nope"]), args, plan, 1)
    with pytest.raises(LoraError, match="zero_stage=3"):
        check_lora(LoraConf(rank=4), args, plan, 3)
    with pytest.raises(LoraError, match="tp=2"):
        check_lora(LoraConf(rank=4), args, plan_of("replicate", tp=2), 0)
    with pytest.raises(LoraError, match="rank"):
        check_lora(LoraConf(rank=-1), args, plan, 0)


def test_launcher_refuses_before_any_process_group():
    from moe_ext.cli import train as launcher
    from moe_ext.dist import DistEnv
    from moe_ext.launching import as_usage_error
    from moe_ext.train.config import TrainConf
    from tests.support import tiny_conf

    def prepare(**over):  # as launcher.run calls it: errors become one-line UsageErrors
        cfg = tiny_conf(TrainConf, **over)
        return as_usage_error(launcher.prepare, cfg, DistEnv(), False, 0)

    with pytest.raises(launcher.UsageError, match="'qproj' names no adaptable module"):
        prepare(**{"train.lora.rank": 4, "train.lora.targets": ["q_proj", "qproj"]})
    with pytest.raises(launcher.UsageError, match="lora.rank=-2"):
        prepare(**{"train.lora.rank": -2})
    job = prepare(**{"train.lora.rank": 4})  # a valid LoRA run passes every check
    assert job.plan.world_size == 1


def test_quantized_base_trains_only_with_lora():
    from moe_ext.cli import train as launcher
    from moe_ext.quant.config import QuantConfig
    from moe_ext.train.config import TrainLoopConf

    args = tiny_args()
    args.quantization = QuantConfig("fp8", weight_block_size=(16, 16))
    with pytest.raises(launcher.UsageError, match="train.lora.rank"):
        launcher._check_loop(TrainLoopConf(), args)
    launcher._check_loop(TrainLoopConf(lora=LoraConf(rank=4)), args)
    assert launcher.model_key(args)["quantization"]["weight_block_size"] == [16, 16]  # JSON


def _family(name):
    from moe_ext.model import ModelArgs
    from tests.support import GPT_OSS_SHAPE, deepseek_hf_config, family_args, qwen2_args

    if name == "qwen2_moe":
        return qwen2_args()  # a dense layer, a shared expert, q/k/v biases
    if name == "deepseek_v3":  # MLA: q_a/q_b, kv_a/kv_b (kv_b's weight used directly)
        return ModelArgs.from_hf_config(deepseek_hf_config("v3").to_dict())
    if name == "gpt_oss":  # sink attention, expert biases, clamped SwiGLU
        return ModelArgs.from_hf_config({**GPT_OSS_SHAPE, "model_type": "gpt_oss"})
    return family_args(name)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_every_adaptable_module_of_each_family_trains_and_merges(family):
    from moe_ext.deepspeed.engine import CausalLMWithAux
    from moe_ext.train.lora import adaptable_modules

    args = _family(family)
    targets = sorted(adaptable_modules(args))
    assert "experts" in targets and "o_proj" in targets
    base, model = _model(args), _model(args)
    # rank 4: fp32 adapter rows of 16 bytes keep the experts on grouped_mm where they were
    summary = apply_lora(model, LoraConf(rank=4, alpha=4, targets=targets))
    ids = _ids(vocab=args.vocab_size, length=10)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
    _randomize_b(model)
    loss = CausalLMWithAux(model, 0.01)(torch.cat([ids, ids[:, :1]], dim=1))[0]
    loss.backward()
    adapters = {n: p for n, p in model.named_parameters() if ".lora." in n}
    assert len({n.partition(".lora.")[0] for n in adapters}) == len(summary.adapted)
    for name, param in adapters.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        assert (adapted - base(ids)).abs().max() > 1e-4
        merge_lora_(model)
        torch.testing.assert_close(model(ids), adapted, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_keeps_adapter_gradients():
    """The frozen embedding gives inputs without grad: recomputed blocks must still give
    the adapters their gradients (non-reentrant checkpointing), equal to the plain ones."""
    from moe_ext.deepspeed.engine import CausalLMWithAux

    grads = []
    for checkpointing in (False, True):
        model = _model()
        apply_lora(model, LoraConf(rank=4, alpha=8, targets=TARGETS))
        _randomize_b(model)
        model.activation_checkpointing = checkpointing
        calls = []
        model.layers["0"].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
        CausalLMWithAux(model.train(), 0.01)(_ids(rows=2, length=13))[0].backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_needs_the_same_lora_setting():
    from moe_ext.train.lora import check_resume_lora, lora_key

    conf = LoraConf(rank=4, alpha=8, targets=["q_proj", "experts"])
    saved = json.loads(json.dumps(lora_key(conf)))  # as meta.json holds it
    check_resume_lora(saved, conf, "ckpt")
    check_resume_lora(None, LoraConf(rank=0), "ckpt")  # full training on both sides
    with pytest.raises(LoraError, match="rank=4 alpha=8 .* resume with the same train.lora"):
        check_resume_lora(saved, LoraConf(rank=8, alpha=8, targets=["q_proj", "experts"]), "c")
    with pytest.raises(LoraError, match="resume with the same"):
        check_resume_lora(saved, LoraConf(rank=0), "ckpt")
    with pytest.raises(LoraError, match="full-parameter training"):
        check_resume_lora(None, conf, "ckpt")
