"""completion_hidden_states / lm_head_params against the model's own logits (fp32, CPU)."""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.integrations.hf import completion_hidden_states, lm_head_params, run_inside_forward

FAMILIES = ["qwen2", "llama", "qwen3"]


def _batch(vocab: int, batch: int, seq: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with a mix of left-padded, right-padded and unpadded rows."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        pad = int(torch.randint(0, seq // 2, (1,), generator=gen))
        if row % 3 == 0:
            attention_mask[row, :pad] = 0  # left padding (prompt side)
        elif row % 3 == 1 and pad:
            attention_mask[row, -pad:] = 0  # right padding (completion side)
    return input_ids, attention_mask


def _reference_logprobs(model, input_ids, attention_mask, keep):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, -keep:, None]).squeeze(-1)


def _fused_logprobs(model, input_ids, attention_mask, keep):
    weight, bias = lm_head_params(model)
    hidden = completion_hidden_states(model, input_ids, attention_mask, keep)
    return rk.fused_linear_logprobs(hidden, weight, input_ids[:, -keep:], bias=bias)


def _head_logprobs(model, input_ids, attention_mask, keep):
    """The hidden states through a plain (unfused) LM head: checks hf.py independently of the kernels."""
    weight, bias = lm_head_params(model)
    hidden = completion_hidden_states(model, input_ids, attention_mask, keep)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, -keep:, None]).squeeze(-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_reproduce_model_logits(make_tiny_lm, family, tied):
    model = make_tiny_lm(family, tie_word_embeddings=tied)
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=5, seq=13, seed=1)
    for keep in (1, 4, 12):
        hidden = completion_hidden_states(model, input_ids, attention_mask, keep)
        assert hidden.shape == (5, keep, model.config.hidden_size)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
        weight, bias = lm_head_params(model)
        assert (weight is model.get_input_embeddings().weight) == tied
        ours = torch.nn.functional.linear(hidden, weight, bias)
        torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logprobs_match_log_softmax(make_tiny_lm, family):
    model = make_tiny_lm(family, seed=3)
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=4, seq=11, seed=2)
    with torch.no_grad():
        expected = _reference_logprobs(model, input_ids, attention_mask, keep=6)
        got = _fused_logprobs(model, input_ids, attention_mask, keep=6)
    mask = attention_mask[:, -6:].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("path", ["head", "fused"])
def test_gradients_match_with_gradient_checkpointing(make_tiny_lm, family, path):
    reference = make_tiny_lm(family, seed=5).train()
    model = make_tiny_lm(family, seed=5).train()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=3, seq=10, seed=4)
    keep = 5
    mask = attention_mask[:, -keep:].float()
    weights = torch.randn(3, keep, generator=torch.Generator().manual_seed(0)) * mask

    (_reference_logprobs(reference, input_ids, attention_mask, keep) * weights).sum().backward()
    ours = {"head": _head_logprobs, "fused": _fused_logprobs}[path]
    (ours(model, input_ids, attention_mask, keep) * weights).sum().backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_run_inside_forward_goes_through_call_hooks(make_tiny_lm):
    model = make_tiny_lm("qwen2")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    result = run_inside_forward(model, lambda a, b=0: a + b, 2, b=3)
    assert result == 5 and calls == ["pre"]
    assert "forward" not in model.__dict__  # the class forward is back
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=2, seq=6, seed=0)
    assert model(input_ids=input_ids, attention_mask=attention_mask).logits.shape == (2, 6, 61)


def test_bad_inputs_raise(make_tiny_lm):
    model = make_tiny_lm("qwen2")
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=2, seq=6, seed=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        completion_hidden_states(model, input_ids, attention_mask, 6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        completion_hidden_states(model, input_ids, attention_mask, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        completion_hidden_states(model, input_ids, attention_mask[:, 1:], 2)
    with pytest.raises(ValueError, match="input_ids"):
        completion_hidden_states(model, input_ids[0], attention_mask, 2)
    with pytest.raises(TypeError, match="model"):
        completion_hidden_states(model.model, input_ids, attention_mask, 2)
    head = model.lm_head
    model.lm_head = torch.nn.Module()
    model.lm_head.base_layer, model.lm_head.weight = head, head.weight  # shaped like a PEFT LoRA layer
    with pytest.raises(ValueError, match="adapters"):
        lm_head_params(model)
    model.lm_head = head
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_params(model)


def test_run_inside_forward_under_ddp(make_tiny_lm, tmp_path):
    """The loss runs inside DDP's forward (its hooks see every step); gradients match plain autograd."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    reference = make_tiny_lm("qwen2", seed=7).train()
    model = make_tiny_lm("qwen2", seed=7).train()
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=3, seq=8, seed=5)
    keep = 4
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        wrapper_calls = []
        ddp.register_forward_pre_hook(lambda module, args: wrapper_calls.append(1))
        compute_loss = lambda: -_head_logprobs(model, input_ids, attention_mask, keep).sum()
        for _ in range(2):
            ddp.zero_grad(set_to_none=True)
            run_inside_forward(ddp, compute_loss).backward()
        assert len(wrapper_calls) == 2
    finally:
        dist.destroy_process_group()
    (-_reference_logprobs(reference, input_ids, attention_mask, keep).sum()).backward()
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_lora_model_matches_its_own_logits(make_tiny_lm, tied):
    """A LoRA-wrapped model (peft): same log-probs as its logits, same gradients for the adapters."""
    peft = pytest.importorskip("peft")

    def lora_model():
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            lora_dropout=0.0,
            init_lora_weights=False,
        )  # non-zero B: adapters matter
        torch.manual_seed(9)
        return peft.get_peft_model(make_tiny_lm("qwen2", tie_word_embeddings=tied, seed=6), config)

    reference, model = lora_model(), lora_model()
    input_ids, attention_mask = _batch(model.config.vocab_size, batch=4, seq=10, seed=5)
    keep = 6
    mask = attention_mask[:, -keep:].float()
    weights = torch.randn(4, keep, generator=torch.Generator().manual_seed(1)) * mask

    expected = _reference_logprobs(reference, input_ids, attention_mask, keep)
    got = _fused_logprobs(model, input_ids, attention_mask, keep)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        without_adapters = _fused_logprobs(model, input_ids, attention_mask, keep)
    assert not torch.allclose(without_adapters, got, atol=1e-3)  # the adapters are in the path
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    trained_ref = [p for p in reference.parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name, _ in trained)
    for (name, p), p_ref in zip(trained, trained_ref):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)

    head_config = peft.LoraConfig(r=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="adapters"):
        lm_head_params(peft.get_peft_model(make_tiny_lm("qwen2"), head_config))
