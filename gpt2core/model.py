"""The GPT-2 decoder of the Cerebras Model Zoo reference, in one file, top-down.

    model = GPT2(params.model)
    logits, loss = model(input_ids, attention_mask=mask, labels=labels)

Pre-LN blocks, learned positions, an output head tied to the token embedding (no bias), dropout
where the reference has it, attention through ``scaled_dot_product_attention`` (flash kernels on
GPU). Parameter names follow Hugging Face ``GPT2LMHeadModel`` so checkpoints map one to one (see
``gpt2core.hf_checkpoint``). Nothing here knows about devices, parallelism, storage or tracking, and
only torch 2.4 APIs are used: the Cerebras SDK pins that release.

``attention_mask`` is the reference's loss mask (1 = real token). GPT-2 data is right-padded, so
causal attention alone already keeps real tokens from seeing padding; the mask weights the loss.

With ``model.padded_vocab_size`` the embedding and head have more rows than the tokenizer has ids
(for faster matmuls); the logits of the extra ids are -inf, so the loss, accuracy and sampling only
ever see the tokenizer's ``vocab_size`` ids.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2core.config import InitializerParams, ModelParams


class GPT2(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.params = p
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(p.embedding_rows, p.hidden_size),
            wpe=nn.Embedding(p.max_position_embeddings, p.hidden_size),
            drop=nn.Dropout(p.dropout_rate if p.embedding_dropout_rate is None else p.embedding_dropout_rate),
            h=nn.ModuleList([Block(p) for _ in range(p.num_hidden_layers)]),
            ln_f=nn.LayerNorm(p.hidden_size, eps=p.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(p.hidden_size, p.embedding_rows, bias=p.use_bias_in_output)
        if p.share_embedding_weights:
            self.lm_head.weight = self.transformer.wte.weight
        # Off: the reference's plain loss, which every backend compiles (the Cerebras flow keeps it).
        # The torch trainer turns it on: see ChunkedHeadLoss.
        self.fused_head_loss = False
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits ``[B, S, embedding_rows]`` (-inf past ``vocab_size``) and, given labels, the
        reference's masked LM loss.

        With ``fused_head_loss`` on, training (labels given, autograd on) runs the output head and the
        loss fused in chunks of tokens and keeps no logits, the largest tensor of a step: (None, loss).
        """
        seq_len = input_ids.size(1)
        if seq_len > self.params.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_position_embeddings "
                             f"{self.params.max_position_embeddings}")
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids.long()) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if labels is None:
            return self._logits(x), None
        weights = loss_weights(labels, attention_mask, self.params)
        if self.fused_head_loss and torch.is_grad_enabled():
            return None, ChunkedHeadLoss.apply(x.flatten(0, 1), self.lm_head.weight, self.lm_head.bias,
                                               labels.flatten().long(), weights, self.params.vocab_size)
        logits = self._logits(x)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().long(), reduction="none")
        return logits, (per_token * weights).sum()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        if self.params.embedding_rows > self.params.vocab_size:  # ids the tokenizer never gives
            logits[..., self.params.vocab_size:] = float("-inf")
        return logits

    def init_weights(self) -> None:
        """GPT-2 initialisation: normal(0, 0.02); residual projections std / sqrt(2 * layers)."""
        p = self.params
        default = InitializerParams(std=p.initializer_range)
        residual = p.output_layer_initializer or InitializerParams(
            std=p.initializer_range / math.sqrt(2 * p.num_hidden_layers))
        for name, module in self.named_modules():
            if module is self.lm_head and p.share_embedding_weights:
                continue  # its weight is the token embedding's, initialised as an embedding
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("c_proj")
                _initialize(module.weight, residual if is_residual else p.initializer or default)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                _initialize(module.weight, p.embedding_initializer or default)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied head counted once); non_embedding leaves out position embeddings
        (as nanoGPT does: the token embedding is used as the output head, so it does compute)."""
        n = sum(t.numel() for t in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training flops per token (forward + backward): 6N + 12·L·H·Q·T (PaLM appendix B)."""
        p = self.params
        return 6 * self.num_params() + 12 * p.num_hidden_layers * p.num_heads * p.head_dim * seq_len


class Block(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.ln_1 = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_epsilon)
        self.attn = CausalSelfAttention(p)
        self.ln_2 = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_epsilon)
        self.mlp = MLP(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.num_heads = p.num_heads
        self.c_attn = nn.Linear(p.hidden_size, 3 * p.hidden_size, bias=p.use_projection_bias_in_attention)
        self.c_proj = nn.Linear(p.hidden_size, p.hidden_size, bias=p.use_ffn_bias_in_attention)
        self.attention_dropout_rate = p.attention_dropout_rate
        self.resid_dropout = nn.Dropout(p.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        # [B, S, 3H] -> three [B, heads, S, head_dim]
        q, k, v = (t.view(batch, seq_len, self.num_heads, -1).transpose(1, 2)
                   for t in self.c_attn(x).split(hidden, dim=2))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attention_dropout_rate if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, seq_len, hidden)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.c_fc = nn.Linear(p.hidden_size, p.filter_size, bias=p.use_ffn_bias)
        # "gelu_new" is the tanh approximation OpenAI's GPT-2 weights were trained with.
        self.act = nn.GELU(approximate="tanh" if p.nonlinearity == "gelu_new" else "none")
        self.c_proj = nn.Linear(p.filter_size, p.hidden_size, bias=p.use_ffn_bias)
        self.dropout = nn.Dropout(p.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


def loss_weights(labels: torch.Tensor, attention_mask: torch.Tensor | None, p: ModelParams) -> torch.Tensor:
    """Per-token weights ``[B*S]`` of the reference's loss = sum(weight * cross entropy):
    ``num_tokens`` averages over the real tokens (mask 1); ``batch_size`` sums the masked tokens,
    divides by the batch size and multiplies by ``loss_weight`` (e.g. 1/max_sequence_length)."""
    mask = (torch.ones_like(labels) if attention_mask is None else attention_mask).flatten().float()
    if p.loss_scaling == "num_tokens":
        return mask / mask.sum().clamp(min=1)
    return mask * (p.loss_weight / labels.size(0))


class ChunkedHeadLoss(torch.autograd.Function):
    """Output head + weighted cross entropy, a chunk of tokens at a time, with the gradients
    computed in the same pass (d loss / d logits = (softmax - onehot) * weight): the [tokens, vocab]
    logits never exist whole and need no separate softmax backward. Inputs: hidden ``[N, H]``,
    head weight ``[V, H]`` (and bias ``[V]`` or None), labels ``[N]``, per-token weights ``[N]``, and
    the number of real ids (logits of ids from there to V count as -inf: a padded vocabulary)."""

    CHUNK_ELEMENTS = 2**26  # logits per chunk (256 MB in fp32)

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, valid_ids):  # noqa: ANN001, ANN205 - autograd.Function
        rows = max(1, ChunkedHeadLoss.CHUNK_ELEMENTS // weight.size(0))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), rows):
            h, y, w = hidden[start:start + rows], labels[start:start + rows], weights[start:start + rows]
            logits = F.linear(h, weight, bias).float()
            logits[:, valid_ids:] = float("-inf")
            target = logits.gather(1, y[:, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(peak).exp_()  # in place: one [rows, vocab] buffer serves the whole chunk
            total = exp.sum(dim=1)
            loss += ((peak.squeeze(1) + total.log() - target) * w).sum()
            grad = exp.mul_((w / total)[:, None])  # softmax * weight
            grad.scatter_add_(1, y[:, None], -w[:, None])  # minus onehot * weight
            grad = grad.to(weight.dtype)
            grad_hidden[start:start + rows] = grad @ weight
            grad_weight += grad.t() @ h.to(weight.dtype)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (grad_hidden * grad_loss, grad_weight * grad_loss,
                None if grad_bias is None else grad_bias * grad_loss, None, None, None)


def _initialize(weight: torch.Tensor, init: InitializerParams) -> None:
    if init.name == "truncated_normal":
        a = init.mean - 2 * init.std if init.a is None else init.a
        b = init.mean + 2 * init.std if init.b is None else init.b
        nn.init.trunc_normal_(weight, mean=init.mean, std=init.std, a=a, b=b)
    else:
        nn.init.normal_(weight, mean=init.mean, std=init.std)
