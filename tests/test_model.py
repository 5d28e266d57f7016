"""The GPT-2 module: sizes, causality, the reference's loss scaling, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2core.config import load_params
from gpt2core.model import GPT2, ChunkedHeadLoss, loss_weights

# Parameter counts of OpenAI's GPT-2 checkpoints (tied head counted once, positions included).
GPT2_PARAMS = {"gpt2_small": 124_439_808, "gpt2_medium": 354_823_168,
               "gpt2_large": 774_030_080, "gpt2_xl": 1_557_611_200}


def tiny_model(**model_overrides) -> GPT2:
    overrides = {f"model.{k}": v for k, v in model_overrides.items()}
    torch.manual_seed(0)
    return GPT2(load_params("gpt2_tiny", overrides).model)


@pytest.mark.parametrize("name", sorted(GPT2_PARAMS))
def test_parameter_counts_match_gpt2(name):
    with torch.device("meta"):  # no memory, no init cost
        model = GPT2(load_params(name).model)
    assert model.num_params(non_embedding=False) == GPT2_PARAMS[name]
    assert model.num_params() == GPT2_PARAMS[name] - 1024 * model.params.hidden_size
    p = model.params
    assert model.flops_per_token(1024) == 6 * model.num_params() + 12 * p.num_hidden_layers * p.hidden_size * 1024


def test_head_is_tied_and_bias_free():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.bias is None
    untied = tiny_model(share_embedding_weights=False, use_bias_in_output=True)
    assert untied.num_params(False) == model.num_params(False) + 50257 * model.params.hidden_size + 50257


def test_attention_is_causal():
    model = tiny_model().eval()
    x = torch.randint(0, 50257, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_loss_scaling_follows_the_reference():
    model = tiny_model().eval()
    x = torch.randint(0, 50257, (2, 16))
    labels = torch.roll(x, -1, dims=1)
    mask = torch.ones_like(x)
    mask[1, 10:] = 0  # right padding
    with torch.no_grad():
        logits, loss = model(x, attention_mask=mask, labels=labels)
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        expected_sum = (per_token * mask.flatten()).sum()
        torch.testing.assert_close(loss, expected_sum / mask.sum())
        by_batch = tiny_model(loss_scaling="batch_size", loss_weight=1 / 16).eval()
        by_batch.load_state_dict(model.state_dict())
        _, loss_b = by_batch(x, attention_mask=mask, labels=labels)
        torch.testing.assert_close(loss_b, expected_sum / 2 / 16)
        # at init the loss is near ln(vocab): the model predicts close to uniform
        assert abs(loss.item() - math.log(50257)) < 1.5


def test_gpt2_initialisation():
    model = tiny_model(num_hidden_layers=8, hidden_size=256, filter_size=1024, num_heads=4)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.transformer.h[0].mlp.c_fc.bias == 0)
    assert torch.all(model.transformer.ln_f.weight == 1)


def test_sequence_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings 128"):
        tiny_model()(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("loss_scaling, tied", [("num_tokens", True), ("batch_size", False)])
def test_fused_training_loss_matches_plain_autograd(monkeypatch, loss_scaling, tied):
    model = tiny_model(loss_scaling=loss_scaling, loss_weight=1 / 16, share_embedding_weights=tied,
                       use_bias_in_output=not tied)
    model.fused_head_loss = True
    monkeypatch.setattr(ChunkedHeadLoss, "CHUNK_ELEMENTS", 50257 * 5)  # several chunks of 5 tokens
    x = torch.randint(0, 50257, (2, 16))
    labels = torch.roll(x, -1, dims=1)
    mask = torch.ones_like(x)
    mask[0, 11:] = 0
    logits, fused = model(x, attention_mask=mask, labels=labels)
    assert logits is None  # training keeps no logits
    fused.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.fused_head_loss = False  # the reference's plain loss, logits kept

    logits, plain = model(x, attention_mask=mask, labels=labels)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(plain, (per_token * loss_weights(labels, mask, model.params)).sum())
    plain.backward()
    torch.testing.assert_close(fused, plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=2e-6, msg=name)  # fp32 sum order


@pytest.mark.parametrize("fused", [False, True])
def test_a_padded_vocabulary_masks_the_extra_ids(monkeypatch, fused):
    """model.padded_vocab_size (50304, nanoGPT's): the same loss and gradients as the tokenizer's 50257
    rows alone, and the extra ids' logits are -inf, however large their weights."""
    padded = tiny_model(padded_vocab_size=50304)
    with torch.no_grad():
        padded.transformer.wte.weight[50257:] = 3.0  # extra rows that would win the argmax unmasked
    plain = tiny_model()
    state = {k: (v[:50257] if k in ("transformer.wte.weight", "lm_head.weight") else v)
             for k, v in padded.state_dict().items()}
    plain.load_state_dict(state)
    monkeypatch.setattr(ChunkedHeadLoss, "CHUNK_ELEMENTS", 50304 * 5)
    x = torch.randint(0, 50257, (2, 16))
    labels = torch.roll(x, -1, dims=1)
    losses = []
    for model in (padded, plain):
        model.fused_head_loss = fused
        _, loss = model(x, attention_mask=torch.ones_like(x), labels=labels)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    grad = padded.transformer.wte.weight.grad
    torch.testing.assert_close(grad[:50257], plain.transformer.wte.weight.grad, rtol=1e-4, atol=2e-6)
    assert not grad[50257:].any()  # the extra rows get no gradient from the loss
    with torch.no_grad():
        logits, _ = padded(x)
    assert logits.shape[-1] == 50304 and torch.isinf(logits[..., 50257:]).all()
    assert int(logits.argmax(-1).max()) < 50257
    from gpt2core.evaluation import sample

    assert max(sample(padded, [1, 2, 3], max_new_tokens=20, temperature=5.0, top_k=None)) < 50257
