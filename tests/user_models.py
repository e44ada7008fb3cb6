"""Small models written in plain torch the way they are commonly written: raw parameters and
``einsum``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, GPT-2's ``Conv1D``,
hand-written norms, keyword inputs and output objects. Tiny on purpose (widths 4-16,
sequences 3-5, vocabularies <= 13) so that a brute-force float64 kernel stays fast.
Initialisation draws from the global RNG: seed it with ``torch.manual_seed`` before building.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RawMLP(nn.Module):
    """Raw ``nn.Parameter`` weights and an ``x**2`` activation, as in the modular-arithmetic
    grokking papers: ``((x W1^T + b1) ** 2) W2^T / hidden``."""

    def __init__(self, in_features: int = 6, hidden: int = 8, out_features: int = 4):
        super().__init__()
        self.hidden = hidden
        self.W1 = nn.Parameter(torch.randn(hidden, in_features) / math.sqrt(in_features))
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.W2 = nn.Parameter(torch.randn(out_features, hidden) / math.sqrt(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return ((x @ self.W1.T + self.b1) ** 2) @ self.W2.T / self.hidden


class RawTransformer(nn.Module):
    """A one-layer TransformerLens-style transformer without LayerNorm: raw ``W_E``, ``W_pos``,
    per-head ``W_Q``/``W_K``/``W_V``/``W_O`` contracted with ``einsum``, identity hook points on
    the activations, logits at the last position (or at every position, as TransformerLens
    returns them, with ``all_positions=True``)."""

    def __init__(
        self,
        vocab: int = 13,
        d_model: int = 8,
        n_heads: int = 2,
        d_head: int = 4,
        d_mlp: int = 16,
        max_len: int = 5,
        vocab_out: int | None = None,
        causal: bool = False,
        tied: bool = False,
        all_positions: bool = False,
    ):
        super().__init__()
        self.causal, self.tied, self.all_positions = causal, tied, all_positions
        self.d_head = d_head
        vocab_out = vocab if tied or vocab_out is None else vocab_out
        self.W_E = nn.Parameter(torch.randn(vocab, d_model) / math.sqrt(d_model))
        self.W_pos = nn.Parameter(torch.randn(max_len, d_model) / math.sqrt(d_model))
        self.W_Q = nn.Parameter(torch.randn(n_heads, d_model, d_head) / math.sqrt(d_model))
        self.W_K = nn.Parameter(torch.randn(n_heads, d_model, d_head) / math.sqrt(d_model))
        self.W_V = nn.Parameter(torch.randn(n_heads, d_model, d_head) / math.sqrt(d_model))
        self.W_O = nn.Parameter(torch.randn(n_heads, d_head, d_model) / math.sqrt(d_head))
        self.W_in = nn.Parameter(torch.randn(d_model, d_mlp) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.randn(d_mlp) * 0.1)
        self.W_out = nn.Parameter(torch.randn(d_mlp, d_model) / math.sqrt(d_mlp))
        if not tied:
            self.W_U = nn.Parameter(torch.randn(d_model, vocab_out) / math.sqrt(d_model))
        self.hook_q, self.hook_k, self.hook_v = nn.Identity(), nn.Identity(), nn.Identity()
        self.hook_pattern = nn.Identity()

    def forward(self, tokens: Tensor) -> Tensor:
        T = tokens.shape[-1]
        x = self.W_E[tokens] + self.W_pos[:T]
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q))
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K))
        v = self.hook_v(torch.einsum("bpd,hde->bphe", x, self.W_V))
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.d_head)
        if self.causal:
            mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=tokens.device), 1)
            scores = scores.masked_fill(mask, float("-inf"))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        x = x + torch.einsum("bqhe,hed->bqd", z, self.W_O)
        x = x + F.relu(x @ self.W_in + self.b_in) @ self.W_out
        h = x if self.all_positions else x[:, -1]
        return h @ self.W_E.T if self.tied else h @ self.W_U


class MHAClassifier(nn.Module):
    """``nn.Embedding`` and ``nn.MultiheadAttention(batch_first=True)`` self-attention, with a
    ``key_padding_mask`` from the pad token (``mask="padding"``) or a causal ``attn_mask``
    (``mask="causal"``), mean-pooled into an ``nn.Linear`` head."""

    def __init__(
        self,
        vocab: int = 11,
        embed_dim: int = 8,
        num_heads: int = 2,
        num_classes: int = 3,
        mask: str | None = None,
        pad_idx: int = 0,
    ):
        super().__init__()
        if mask not in (None, "padding", "causal"):
            raise ValueError(f"`mask` must be None, 'padding' or 'causal', got {mask!r}.")
        self.mask, self.pad_idx = mask, pad_idx
        self.embed = nn.Embedding(vocab, embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        T = tokens.shape[1]
        if self.mask == "padding":
            padding = tokens == self.pad_idx
            h, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
            keep = (~padding).unsqueeze(-1).to(h.dtype)
            pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        else:
            causal = None
            if self.mask == "causal":
                causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
            h, _ = self.attn(x, x, x, attn_mask=causal, need_weights=False)
            pooled = h.mean(dim=1)
        return self.head(pooled)


class EncoderClassifier(nn.Module):
    """``nn.Embedding`` plus a learned positional ``nn.Parameter``, one
    ``nn.TransformerEncoderLayer(batch_first=True)`` and an ``nn.Linear`` head on position 0
    (``pool="first"``, BERT's [CLS]) or on the mean over positions (``pool="mean"``)."""

    def __init__(
        self,
        vocab: int = 11,
        d_model: int = 8,
        nhead: int = 2,
        dim_feedforward: int = 16,
        max_len: int = 5,
        num_classes: int = 3,
        pool: str = "first",
    ):
        super().__init__()
        if pool not in ("first", "mean"):
            raise ValueError(f"`pool` must be 'first' or 'mean', got {pool!r}.")
        self.pool = pool
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, max_len, d_model) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        h = self.encoder(x)
        return self.head(h[:, 0] if self.pool == "first" else h.mean(dim=1))


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D`` (Hugging Face transformers): a linear layer with the weight stored
    transposed, ``(nx, nf)``, applied with ``torch.addmm``."""

    def __init__(self, nf: int, nx: int, std: float = 0.02):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=std)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005  (as GPT-2 writes it)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DModel(nn.Module):
    """A one-block GPT-2 in the Hugging Face layout: token and position ``nn.Embedding``,
    pre-LayerNorm, ``Conv1D`` ``c_attn`` split into q, k, v, causal
    ``F.scaled_dot_product_attention``, ``Conv1D`` ``c_proj``, a GELU MLP of two ``Conv1D``,
    final LayerNorm, and last-position logits through the tied head ``h @ wte.weight.T``."""

    def __init__(
        self,
        vocab: int = 13,
        n_embd: int = 8,
        n_head: int = 2,
        n_positions: int = 5,
        n_inner: int = 16,
        dropout: float = 0.1,
        initializer_range: float = 0.2,
    ):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.drop = nn.Dropout(dropout)
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = Conv1D(3 * n_embd, n_embd, std=initializer_range)
        self.c_proj = Conv1D(n_embd, n_embd, std=initializer_range)
        self.resid_dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = Conv1D(n_inner, n_embd, std=initializer_range)
        self.c_proj_mlp = Conv1D(n_embd, n_inner, std=initializer_range)
        self.act = nn.GELU(approximate="tanh")
        self.ln_f = nn.LayerNorm(n_embd)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, c = x.size()
        return x.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)

    def forward(self, input_ids: Tensor) -> Tensor:
        b, t = input_ids.size()
        position_ids = torch.arange(t, dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden = self.drop(self.wte(input_ids) + self.wpe(position_ids))

        residual = hidden
        q, k, v = self.c_attn(self.ln_1(hidden)).split(hidden.size(-1), dim=2)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        attn = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        attn = attn.transpose(1, 2).contiguous().view(b, t, -1)
        hidden = residual + self.resid_dropout(self.c_proj(attn))

        residual = hidden
        mlp = self.c_proj_mlp(self.act(self.c_fc(self.ln_2(hidden))))
        hidden = residual + self.resid_dropout(mlp)

        h = self.ln_f(hidden)[:, -1]
        return h @ self.wte.weight.T


class SharedElementwise(nn.Module):
    """One weight in a matmul and elementwise (``x @ W``, then ``h * W.diagonal()`` and
    ``h * W[0]``), and a 1-D gain used as a scale ``x * g`` and as a shift ``+ g``: the
    hand-rolled gating and scaling of research code."""

    def __init__(self, d: int = 6, out_features: int = 3):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.g = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.out = nn.Linear(d, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh((x * self.g) @ self.W + self.g)
        h = h * self.W.diagonal() + torch.sin(h) * self.W[0]
        return self.out(h)


class RMSNormMLP(nn.Module):
    """A LLaMA-style hand-written RMSNorm with a raw gain parameter and an ``nn.LayerNorm``
    between ``nn.Linear`` layers."""

    def __init__(self, in_features: int = 6, hidden: int = 8, out_features: int = 3):
        super().__init__()
        self.eps = 1e-6
        self.fc1 = nn.Linear(in_features, hidden)
        self.gain = nn.Parameter(torch.ones(hidden))
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc3 = nn.Linear(hidden, out_features)

    def rms_norm(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.rms_norm(self.fc1(x)))
        h = torch.tanh(self.norm(self.fc2(h)))
        return self.fc3(h)


@dataclass
class SequenceClassifierOutput:
    """The fields of Hugging Face's ``SequenceClassifierOutput`` that a small model fills."""

    logits: Tensor
    loss: Tensor | None = None
    hidden_states: Tensor | None = None


class HFStyleClassifier(nn.Module):
    """A Hugging Face-style sequence classifier: keyword inputs
    ``forward(input_ids, attention_mask=None, labels=None)``, the attention mask used to
    mean-pool, and an output object with ``.logits``."""

    def __init__(self, vocab: int = 11, hidden: int = 8, num_labels: int = 3):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SequenceClassifierOutput:
        hidden_states = torch.tanh(self.dense(self.embeddings(input_ids)))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        pooled = (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(logits=logits, loss=loss, hidden_states=hidden_states)


class DictArgumentClassifier(nn.Module):
    """The Hugging Face-style classifier behind a ``forward(self, batch)`` that takes the dict
    batch whole, as a LightningModule often does: ``self.model(**batch).logits``."""

    def __init__(self, **kwargs):
        super().__init__()
        self.model = HFStyleClassifier(**kwargs)

    def forward(self, batch: dict) -> Tensor:
        return self.model(**batch).logits


class PaddedEncoderLayer(nn.Module):
    """A post-LayerNorm encoder layer as BERT writes it: one ``nn.Linear`` for q, k and v split
    into heads (N, H, T, d), ``F.scaled_dot_product_attention`` with an additive mask, an output
    ``nn.Linear``, a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        x = self.norm1(x + self.out(h.transpose(1, 2).reshape(n, t, d)))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class PaddedEncoder(nn.Module):
    """A BERT/RoBERTa-style classifier whose attention mask is data-dependent code on the
    token ids, as Hugging Face models build it: the mask from ``input_ids != pad_idx`` when
    none is given, a padding check (a Python branch on the data, which ``vmap`` cannot run)
    that leaves the mask out when no point has padding, an additive mask made with
    ``torch.where``, RoBERTa's position ids from the mask's cumulative sum, and a tanh pooler
    on position 0. Points: token ids, or a dict with ``input_ids`` and ``attention_mask``."""

    def __init__(
        self,
        vocab: int = 11,
        d_model: int = 8,
        n_heads: int = 2,
        d_ff: int = 16,
        n_layers: int = 1,
        max_len: int = 8,
        num_classes: int = 3,
        pad_idx: int = 0,
    ):
        super().__init__()
        self.pad_idx = pad_idx
        self.tokens = nn.Embedding(vocab, d_model, padding_idx=pad_idx)
        self.positions = nn.Embedding(max_len + pad_idx + 1, d_model, padding_idx=pad_idx)
        self.norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(
            PaddedEncoderLayer(d_model, n_heads, d_ff) for _ in range(n_layers)
        )
        self.pool = nn.Linear(d_model, d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_idx).long()
        position_ids = torch.cumsum(attention_mask, dim=1) * attention_mask + self.pad_idx
        x = self.norm(self.tokens(input_ids) + self.positions(position_ids))
        bias = None
        if (attention_mask == 0).any():
            keep = attention_mask[:, None, None, :].bool()
            bias = torch.where(keep, x.new_zeros(()), x.new_tensor(torch.finfo(x.dtype).min))
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(torch.tanh(self.pool(x[:, 0])))


class SeqFirstEncoder(nn.Module):
    """Sequence-first attention, PyTorch's default layout: ``nn.Embedding`` plus learned
    positions, transposed to (T, N, E) for an ``nn.TransformerEncoderLayer(batch_first=False)``
    with a key padding mask from the pad token, whose ``nn.MultiheadAttention`` merges the
    points after the positions (``view(T * N, E)``); a masked mean over positions into an
    ``nn.Linear`` head."""

    def __init__(
        self,
        vocab: int = 11,
        d_model: int = 8,
        nhead: int = 2,
        dim_feedforward: int = 16,
        num_layers: int = 1,
        max_len: int = 8,
        num_classes: int = 3,
        pad_idx: int = 0,
    ):
        super().__init__()
        self.pad_idx = pad_idx
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, 1, d_model) * 0.1)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == self.pad_idx
        x = self.embed(tokens).transpose(0, 1) + self.pos[: tokens.shape[1]]  # (T, N, E)
        h = self.encoder(x, src_key_padding_mask=padding)
        keep = (~padding).T.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(0) / keep.sum(0).clamp(min=1))


class TiedHeads(nn.Module):
    """Per-head weights used as ``V`` and as ``V^T`` in each head (a tied autoencoder per
    head): ``W`` (H, d_head, k) maps each head's slice up with ``einsum`` and back down with the
    same ``W`` transposed, between a token embedding and an ``nn.Linear`` head."""

    def __init__(self, vocab: int = 11, heads: int = 2, d_head: int = 3, k: int = 4, classes=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, heads * d_head)
        self.W = nn.Parameter(torch.randn(heads, d_head, k) / math.sqrt(d_head))
        self.head = nn.Linear(heads * d_head, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        x = self.embed(tokens).view(n, t, self.heads, -1)
        up = torch.tanh(torch.einsum("nthd,hdk->nthk", x, self.W))
        down = torch.einsum("nthk,hdk->nthd", up, self.W)
        return self.head(torch.tanh(down.reshape(n, t, -1)).mean(1))


class Float32NormMLP(nn.Module):
    """A float64 model with float32 islands, as Hugging Face writes its norms: an RMSNorm that
    computes in float32 and casts back (``x.to(torch.float32)`` ... ``weight * x.to(dtype)``),
    and with ``cast_hidden`` a layer fed ``x.float()`` cast back after it; with ``gemma``
    Gemma's norm, ``x * (1 + weight.float())`` in float32."""

    def __init__(self, d=5, hidden=8, out_features=3, cast_hidden=False, gemma=False):
        super().__init__()
        self.cast_hidden, self.gemma = cast_hidden, gemma
        self.fc1 = nn.Linear(d, hidden)
        self.norm_weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_features)

    def rms_norm(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.gemma:
            return (x * (1.0 + self.norm_weight.float())).to(dtype)
        return self.norm_weight * x.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.rms_norm(self.fc1(x)))
        if self.cast_hidden:
            w, b = self.fc2.weight, self.fc2.bias
            h = torch.tanh(F.linear(h.float(), w.float(), b.float()).to(x.dtype))
        else:
            h = torch.tanh(self.fc2(h))
        return self.fc3(h)


class RelativeBiasAttention(nn.Module):
    """Window attention with a shared relative-position bias, as Swin and T5 write it: a
    table of (relative offsets, heads) looked up with a fixed index buffer (``table[index]``,
    Swin) or ``nn.Embedding`` (T5), reshaped and permuted into the heads, and added to every
    point's attention scores; or, with ``sdpa``, passed as the additive ``attn_mask`` of
    ``F.scaled_dot_product_attention``, after ``torch.where`` with a causal mask when
    ``causal`` (as ``transformers``' SDPA attention passes T5's bias)."""

    def __init__(
        self, vocab=11, t=4, d=8, heads=2, classes=3, lookup="index", sdpa=False, causal=False
    ):
        super().__init__()
        self.heads, self.lookup, self.sdpa, self.causal = heads, lookup, sdpa, causal
        self.embed = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, classes)
        self.table = nn.Embedding(2 * t - 1, heads)
        pos = torch.arange(t)
        self.register_buffer("index", pos[None, :] - pos[:, None] + t - 1)

    def bias(self) -> Tensor:
        t = self.index.shape[0]
        if self.lookup == "index":  # Swin: table[index.view(-1)].view(T, T, H).permute
            rows = self.table.weight[self.index.view(-1)]
            return rows.view(t, t, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return self.table(self.index).permute([2, 0, 1]).unsqueeze(0)  # T5

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        q, k, v = self.qkv(self.embed(tokens)).view(n, t, 3, self.heads, -1).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if self.sdpa:
            mask = self.bias()
            if self.causal:
                allowed = torch.ones(t, t, dtype=torch.bool).tril().view(1, 1, t, t)
                mask = torch.where(allowed, mask, torch.finfo(mask.dtype).min)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.bias()
            h = scores.softmax(-1) @ v
        h = h.transpose(1, 2).reshape(n, t, -1)
        return self.out(torch.tanh(h).mean(1))


class CachedRecurrent(nn.Module):
    """A recurrent cell that, with ``use_cache=True`` (the default, as RWKV's), decays its
    state in place after the step: the eval-mode forward cannot be differentiated, and
    ``use_cache=False`` can."""

    def __init__(self, d: int = 5, hidden: int = 6, out_features: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, out_features)
        self.decay = 0.5

    def forward(self, x: Tensor, use_cache: bool = True) -> Tensor:
        state = torch.exp(-self.inp(x).pow(2))  # exp keeps its output for the backward pass
        out = self.head(state)
        if use_cache:
            state.mul_(self.decay)  # the cache for the next step, in place
        return out


class _OldStyleGelu(torch.autograd.Function):
    """A GELU as an old-style ``autograd.Function`` (``ctx`` in ``forward``, no
    ``setup_context``), as BLOOM writes it: ``torch.func`` refuses it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        inner = 0.79788456 * x * (1 + 0.044715 * x * x)
        th = torch.tanh(inner)
        d_inner = 0.79788456 * (1 + 3 * 0.044715 * x * x)
        return grad * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * d_inner)


class OldStyleFunctionMLP(nn.Module):
    """An MLP whose activation is an old-style ``autograd.Function`` (BLOOM's GELU)."""

    def __init__(self, d: int = 5, hidden: int = 8, out_features: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_OldStyleGelu.apply(self.fc1(x)))


class KeywordConv(nn.Module):
    """A causal depthwise convolution called with keywords and no ``stride``, as Mamba's CPU
    path calls it (``F.conv1d(input=..., weight=..., bias=..., padding=k - 1, groups=d)``),
    and a ``conv2d`` given ``padding="valid"``."""

    def __init__(self, vocab: int = 11, d: int = 4, k: int = 3, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, k, groups=d, padding=k - 1)
        self.conv2 = nn.Conv2d(1, 2, 2)
        self.out = nn.Linear(2 * (d - 1), classes)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens).transpose(1, 2)
        w, b = self.conv.weight, self.conv.bias
        h = F.conv1d(input=x, weight=w, bias=b, padding=w.shape[-1] - 1, groups=x.shape[1])
        h = F.silu(h[..., :t]).mean(-1)  # (N, d)
        g = F.conv2d(h[:, None, :, None].expand(-1, 1, -1, 2), self.conv2.weight,
                     self.conv2.bias, padding="valid")  # fmt: skip
        return self.out(torch.tanh(g).flatten(1))


class TokenRouting(nn.Module):
    """Tokens routed by sign to one of two experts, each applied to the tokens it gets
    (``x[idx]``, a data-dependent number of rows, then ``index_add_``), as mixture-of-experts
    layers do: the operations' shapes differ from point to point."""

    def __init__(self, vocab: int = 11, d: int = 6, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.experts = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)])
        self.out = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        flat = h.reshape(-1, h.shape[-1])
        mixed = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = ((flat[:, 0] > 0) == bool(e)).nonzero()[:, 0]
            mixed = mixed.index_add(0, idx, torch.tanh(expert(flat[idx])))
        return self.out(mixed.view_as(h).mean(1))


class ExpertParameters(nn.Module):
    """A mixture of experts whose experts are stored as one 3-D parameter each and indexed by
    expert, as ``transformers``' Mixtral writes it: a linear router picks the top two of four
    experts per token, and each expert ``e`` that some token chose runs
    ``F.linear(x, gate_up_proj[e])`` (``e`` a 0-d tensor), a SwiGLU and
    ``F.linear(h, down_proj[e])`` on its tokens, weighted and added back with ``index_add_``.
    Which experts run, and on how many rows, differs from point to point."""

    def __init__(self, vocab=11, d=6, hidden=8, experts=4, top_k=2, classes=3):
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.embed = nn.Embedding(vocab, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, d) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(experts, d, hidden) / math.sqrt(hidden))
        self.out = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        flat = h.reshape(-1, h.shape[-1])
        weights, chosen = self.router(flat).softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        mixed = torch.zeros_like(flat)
        with torch.no_grad():
            mask = F.one_hot(chosen, self.experts).permute(2, 1, 0)  # (E, top_k, rows)
            hit = (mask.sum(dim=(-1, -2)) > 0).nonzero()
        for expert in hit:
            expert = expert[0]
            slot, rows = torch.where(mask[expert])
            gate, up = F.linear(flat[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            mixed.index_add_(0, rows, y * weights[rows, slot, None])
        return self.out((h + mixed.view_as(h)).mean(1))


class DroppedRelativeEmbeddings(nn.Module):
    """A table of relative embeddings passed through dropout (the identity in eval mode) and
    projected by a linear layer that the points' hidden states also go through, as
    DeBERTa-v2 writes it: ``key_proj(dropout(rel_embeddings))``."""

    def __init__(self, vocab=11, d=6, positions=4, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rel_embeddings = nn.Parameter(torch.randn(positions, d))
        self.dropout = nn.Dropout(0.1)
        self.key_proj = nn.Linear(d, d)
        self.out = nn.Linear(positions, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.key_proj(self.embed(tokens))  # (N, T, d)
        keys = self.key_proj(self.dropout(self.rel_embeddings))  # (positions, d), shared
        return self.out(torch.tanh(h @ keys.transpose(-1, -2)).mean(1))
