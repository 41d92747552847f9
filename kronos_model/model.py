"""Kronos: a BSQ tokenizer and a decoder-only predictor for K-line (candle) sequences.

Read top to bottom: building blocks (norm, rotary embedding, attention, feed-forward, block), then the
tokenizer (encoder -> binary spherical quantizer -> decoder), then the predictor (token + calendar
embedding -> causal trunk -> s1 head, and a dependency layer -> s2 head).

Everything here is checkpoint-compatible with the released NeoQuasar/Kronos-* weights: the constructor
arguments are the keys of their `config.json`, the module attribute names are their state-dict keys, and the
persistent buffers (`*.rotary.inv_freq`, `tokenizer.bsq.basis`, `tokenizer.bsq.group_basis`) are kept. The
numbers match the original implementation in eval mode (see tests/test_model_reference.py).

Deliberate behaviour kept from the original because the weights were trained with it:
- rotary positions restart at 0 for every call (window-relative);
- the dependency layer's rotary table is built from the *query* length, so at inference (one query) no key
  is rotated, and its attention is causal only in train mode;
- the sibling embedding for the s2 head is the raw `emb_s1` lookup (no sqrt(d_model) scale).

Additions: an optional key/value cache (`KVCache`) so forecasting feeds one token per step, and a padding
mask that works (the original raises when one is passed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kronos_model.attention import KVCache, attention, attention_mask, unblock_empty_rows
from kronos_model.hub import HubMixin

# ----------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16/fp16 activations do not lose the mean square.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryPositionalEmbedding(nn.Module):
    """Rotate-half RoPE with base 10000. `inv_freq` is persistent because the released files carry it."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", self._inv_freq(head_dim))

    @staticmethod
    def _inv_freq(head_dim: int, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables of shape (len, head_dim) for integer positions, always computed in float32: a model
        cast to bf16 would otherwise round positions above 256 and the buffer's frequencies."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            inv_freq = self._inv_freq(self.head_dim, inv_freq.device)
        angles = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated_half * sin).to(x.dtype)


class _RotaryAttention(nn.Module):
    """Projections (q, k, v, out, with bias), rotary table and dropouts shared by both attention layers."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.rotary = RotaryPositionalEmbedding(self.head_dim)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)


class MultiHeadAttentionWithRoPE(_RotaryAttention):
    """Causal self-attention; rotary positions start at 0 for the first token of the window."""

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, length, d_model = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary.cos_sin(torch.arange(start, start + length, device=x.device))
        q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        if cache is not None:
            if key_padding_mask is not None:
                raise ValueError("a KV cache and a padding mask cannot be combined")
            out = cache.attend(q, k, v)
        else:
            mask, is_causal = attention_mask(length, length, x.device, key_padding_mask)
            out = attention(q, k, v, mask, is_causal, self.attn_dropout_p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, length, d_model)
        return self.resid_dropout(self.out_proj(out))


class MultiHeadCrossAttentionWithRoPE(_RotaryAttention):
    """Cross-attention of the dependency layer.

    As in the original, the rotary table is built for the query length and applied to both queries and keys:
    in training (query length == key length) positions line up; at inference (one query) the rotation is the
    identity. Causal only in train mode. `project_kv` / `attend` split the work so forecasting can cache the
    projected keys and values (which, unrotated at inference, do not depend on the query).
    """

    def project_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(key)), self._heads(self.v_proj(value))

    def attend(
        self,
        query: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, q_len, d_model = query.shape
        q = self._heads(self.q_proj(query))
        if q_len > 1:  # with one query the table is position 0: cos = 1, sin = 0, the identity
            cos, sin = self.rotary.cos_sin(torch.arange(q_len, device=query.device))
            q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
        mask, is_causal = None, self.training
        if key_padding_mask is not None:
            mask = ~key_padding_mask.bool()[:, None, None, :]
            if self.training:  # the original's causal mask, aligned top-left
                mask = mask & torch.ones(q_len, k.shape[-2], dtype=torch.bool, device=query.device).tril()
            mask, is_causal = unblock_empty_rows(mask), False
        # q_len 1 in train mode is causal top-left: the query sees key 0 only (kept from the original)
        if is_causal and q_len == 1:
            k, v, is_causal = k[..., :1, :], v[..., :1, :], False
        out = attention(q, k, v, mask, is_causal, self.attn_dropout_p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, q_len, d_model)
        return self.resid_dropout(self.out_proj(out))

    def attend_cached(self, query: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One query per row (a generation step, eval mode) over the keys/values in `cache` (from
        `project_kv`; with one query the rotation is the identity, so they serve unrotated)."""
        batch, q_len, d_model = query.shape
        if q_len != 1:
            raise ValueError(f"attend_cached takes one query per row, got {q_len}")
        out = cache.read(self._heads(self.q_proj(query)))
        return self.resid_dropout(self.out_proj(out.transpose(1, 2).reshape(batch, 1, d_model)))

    def forward(self, query, key, value, key_padding_mask=None):
        k, v = self.project_kv(key, value)
        return self.attend(query, k, v, key_padding_mask)


class FeedForward(nn.Module):
    """SwiGLU without biases."""

    def __init__(self, d_model: int, ff_dim: int, ffn_dropout_p: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(d_model, ff_dim, bias=False)
        self.w3 = nn.Linear(d_model, ff_dim, bias=False)
        self.w2 = nn.Linear(ff_dim, d_model, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, d_model, n_heads, ff_dim=1024, ffn_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.self_attn = MultiHeadAttentionWithRoPE(d_model, n_heads, attn_dropout_p, resid_dropout_p)
        self.norm2 = RMSNorm(d_model)
        self.ffn = FeedForward(d_model, ff_dim, ffn_dropout_p)

    def forward(self, x, key_padding_mask=None, cache: KVCache | None = None):
        x = x + self.self_attn(self.norm1(x), key_padding_mask=key_padding_mask, cache=cache)
        return x + self.ffn(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x, key_padding_mask=None, caches: list[KVCache] | None = None):
    for i, block in enumerate(blocks):
        x = block(x, key_padding_mask=key_padding_mask, cache=None if caches is None else caches[i])
    return x


def _check_heads(name: str, d_model: int, n_heads: int) -> None:
    if n_heads <= 0 or d_model % n_heads != 0:
        raise ValueError(f"{name}: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    if (d_model // n_heads) % 2 != 0:
        raise ValueError(f"{name}: the head dimension d_model/n_heads = {d_model // n_heads} must be even (RoPE)")


def _check_bits(name: str, s1_bits: int, s2_bits: int) -> None:
    if s1_bits != s2_bits:
        raise ValueError(
            f"{name}: s1_bits ({s1_bits}) must equal s2_bits ({s2_bits}); the original Kronos code silently "
            "mis-decodes token ids when they differ, so such checkpoints cannot be made compatible"
        )
    if not 1 <= s1_bits <= 16:
        raise ValueError(f"{name}: s1_bits must be between 1 and 16, got {s1_bits}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: per-bar autoencoder with Binary Spherical Quantization (BSQ)


class BinarySphericalQuantizer(nn.Module):
    """Sign quantization of an L2-normalised vector, with the BSQ commitment and entropy losses.

    Token ids are little-endian over the code dimensions (dim 0 = least significant bit). `basis` and
    `group_basis` are the original's big-endian buffers; they only feed metrics but the released files hold
    them, so they are kept persistent.
    """

    def __init__(self, embed_dim, beta, gamma0, gamma, zeta, group_size):
        super().__init__()
        self.embed_dim = embed_dim
        self.beta, self.gamma0, self.gamma, self.zeta = beta, gamma0, gamma, zeta
        self.group_size = group_size
        self.register_buffer("basis", 2 ** torch.arange(embed_dim - 1, -1, -1))
        self.register_buffer("group_basis", 2 ** torch.arange(group_size - 1, -1, -1))

    @staticmethod
    def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))

    def forward(self, z: torch.Tensor, collect_metrics: bool = True):
        """z: L2-normalised (..., K). Returns (scaled code with straight-through gradient, loss)."""
        hard = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
        code = (z + (hard - z).detach()) * (1.0 / math.sqrt(self.embed_dim))
        if not collect_metrics:
            return code, None
        # Per-bit soft probabilities (the 'analytical' per-sample entropy); the codebook entropy uses their
        # batch means. As in the original, group_size does not enter the loss.
        p = torch.sigmoid(-4 * z / math.sqrt(self.embed_dim))
        per_sample_entropy = self._binary_entropy(p).sum(-1).mean()
        codebook_entropy = self._binary_entropy(p.reshape(-1, self.embed_dim).mean(0)).sum()
        commit_loss = self.beta * ((code.detach() - z) ** 2).sum(-1).mean()
        loss = commit_loss + self.zeta * (self.gamma0 * per_sample_entropy - self.gamma * codebook_entropy)
        return code, loss


class BSQuantizer(nn.Module):
    def __init__(self, s1_bits, s2_bits, beta, gamma0, gamma, zeta, group_size):
        super().__init__()
        self.s1_bits, self.s2_bits = s1_bits, s2_bits
        self.codebook_dim = s1_bits + s2_bits
        self.bsq = BinarySphericalQuantizer(self.codebook_dim, beta, gamma0, gamma, zeta, group_size)

    @staticmethod
    def bits_to_indices(bits: torch.Tensor) -> torch.Tensor:
        weights = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.long)
        return ((bits >= 0).long() * weights).sum(-1)

    def forward(self, z: torch.Tensor, half: bool = False, collect_metrics: bool = True):
        code, loss = self.bsq(F.normalize(z, dim=-1), collect_metrics=collect_metrics)
        if half:
            ids = [self.bits_to_indices(code[..., : self.s1_bits]), self.bits_to_indices(code[..., self.s1_bits :])]
        else:
            ids = self.bits_to_indices(code)
        return loss, code, ids


class KronosTokenizer(nn.Module, HubMixin):
    """Encoder -> BSQ (s1 = coarse bits 0..s1_bits-1, s2 = fine bits) -> decoder, all causal over time.

    Note the original builds n_enc_layers - 1 encoder and n_dec_layers - 1 decoder blocks; kept for the weights.
    """

    config_keys = (
        "d_in", "d_model", "n_heads", "ff_dim", "n_enc_layers", "n_dec_layers", "ffn_dropout_p",
        "attn_dropout_p", "resid_dropout_p", "s1_bits", "s2_bits", "beta", "gamma0", "gamma", "zeta", "group_size",
    )

    def __init__(self, d_in, d_model, n_heads, ff_dim, n_enc_layers, n_dec_layers, ffn_dropout_p, attn_dropout_p,
                 resid_dropout_p, s1_bits, s2_bits, beta, gamma0, gamma, zeta, group_size):
        super().__init__()
        _check_heads("KronosTokenizer", d_model, n_heads)
        _check_bits("KronosTokenizer", s1_bits, s2_bits)
        if n_enc_layers < 1 or n_dec_layers < 1:
            raise ValueError("KronosTokenizer: n_enc_layers and n_dec_layers must be >= 1")
        self.config = {k: v for k, v in locals().items() if k in self.config_keys}
        self.d_in, self.d_model, self.s1_bits, self.s2_bits = d_in, d_model, s1_bits, s2_bits
        self.codebook_dim = s1_bits + s2_bits

        def block():
            return TransformerBlock(d_model, n_heads, ff_dim, ffn_dropout_p, attn_dropout_p, resid_dropout_p)

        self.embed = nn.Linear(d_in, d_model)
        self.encoder = nn.ModuleList([block() for _ in range(n_enc_layers - 1)])
        self.quant_embed = nn.Linear(d_model, self.codebook_dim)
        self.tokenizer = BSQuantizer(s1_bits, s2_bits, beta, gamma0, gamma, zeta, group_size)
        self.post_quant_embed_pre = nn.Linear(s1_bits, d_model)
        self.post_quant_embed = nn.Linear(self.codebook_dim, d_model)
        self.decoder = nn.ModuleList([block() for _ in range(n_dec_layers - 1)])
        self.head = nn.Linear(d_model, d_in)

    def _pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_embed(run_blocks(self.encoder, self.embed(x)))

    def forward(self, x: torch.Tensor):
        """Training forward: ((coarse reconstruction, full reconstruction), bsq_loss, code, composite ids)."""
        loss, code, ids = self.tokenizer(self._pre_quant(x))
        z_pre = self.head(run_blocks(self.decoder, self.post_quant_embed_pre(code[..., : self.s1_bits])))
        z_full = self.head(run_blocks(self.decoder, self.post_quant_embed(code)))
        return (z_pre, z_full), loss, code, ids

    def encode(self, x: torch.Tensor, half: bool = False):
        """(B, T, d_in) -> [s1_ids, s2_ids] if half else composite ids (s1 in the low bits)."""
        _, _, ids = self.tokenizer(self._pre_quant(x), half=half, collect_metrics=False)
        return ids

    def indices_to_bits(self, ids, half: bool = False) -> torch.Tensor:
        def bits(index: torch.Tensor, n: int) -> torch.Tensor:
            weights = 2 ** torch.arange(n, device=index.device, dtype=torch.long)
            return (index.long().unsqueeze(-1) & weights) != 0

        if half:
            flags = torch.cat([bits(ids[0], self.s1_bits), bits(ids[1], self.s2_bits)], dim=-1)
        else:
            flags = bits(ids, self.codebook_dim)
        code = (flags.float() * 2 - 1) * (1.0 / math.sqrt(self.codebook_dim))
        return code.to(self.post_quant_embed.weight.dtype)

    def decode_code(self, code: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        return self.head(run_blocks(self.decoder, self.post_quant_embed(code), caches=caches))

    def decode(self, ids, half: bool = False) -> torch.Tensor:
        """Token ids -> reconstructed normalised features (B, T, d_in)."""
        return self.decode_code(self.indices_to_bits(ids, half))


# ----------------------------------------------------------------------------------------------------------
# Predictor


class FixedEmbedding(nn.Module):
    """Sinusoidal table (only used when learn_te is false; no released model does that)."""

    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        table = torch.zeros(c_in, d_model)
        position = torch.arange(0, c_in).float().unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        table[:, 0::2] = torch.sin(position * div_term)
        table[:, 1::2] = torch.cos(position * div_term)
        self.emb = nn.Embedding(c_in, d_model)
        self.emb.weight = nn.Parameter(table, requires_grad=False)

    def forward(self, x):
        return self.emb(x).detach()


class TemporalEmbedding(nn.Module):
    """Sum of minute, hour, weekday (Mon=0), day-of-month and month embeddings; stamp columns in that order."""

    def __init__(self, d_model: int, learn_pe: bool):
        super().__init__()
        embed = nn.Embedding if learn_pe else FixedEmbedding
        self.minute_embed = embed(60, d_model)
        self.hour_embed = embed(24, d_model)
        self.weekday_embed = embed(7, d_model)
        self.day_embed = embed(32, d_model)
        self.month_embed = embed(13, d_model)

    def forward(self, stamp: torch.Tensor) -> torch.Tensor:
        s = stamp.long()
        return (self.hour_embed(s[..., 1]) + self.weekday_embed(s[..., 2]) + self.day_embed(s[..., 3])
                + self.month_embed(s[..., 4]) + self.minute_embed(s[..., 0]))


class HierarchicalEmbedding(nn.Module):
    def __init__(self, s1_bits: int, s2_bits: int, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.emb_s1 = nn.Embedding(2**s1_bits, d_model)
        self.emb_s2 = nn.Embedding(2**s2_bits, d_model)
        self.fusion_proj = nn.Linear(2 * d_model, d_model)

    def forward(self, token_ids) -> torch.Tensor:
        s1_ids, s2_ids = token_ids
        scale = math.sqrt(self.d_model)
        return self.fusion_proj(torch.cat([self.emb_s1(s1_ids) * scale, self.emb_s2(s2_ids) * scale], dim=-1))


class DependencyAwareLayer(nn.Module):
    """s2 conditioning: norm(trunk_state + cross_attn(query = emb_s1(s1), keys = trunk states)); 4 heads."""

    def __init__(self, d_model: int, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = MultiHeadCrossAttentionWithRoPE(d_model, n_heads, dropout, dropout)
        self.norm = RMSNorm(d_model)

    def forward(self, hidden_states, sibling_embed, key_padding_mask=None):
        attn = self.cross_attn(sibling_embed, hidden_states, hidden_states, key_padding_mask=key_padding_mask)
        return self.norm(hidden_states + attn)


class DualHead(nn.Module):
    def __init__(self, s1_bits: int, s2_bits: int, d_model: int):
        super().__init__()
        self.vocab_s1, self.vocab_s2 = 2**s1_bits, 2**s2_bits
        self.proj_s1 = nn.Linear(d_model, self.vocab_s1)
        self.proj_s2 = nn.Linear(d_model, self.vocab_s2)

    def compute_loss(self, s1_logits, s2_logits, s1_targets, s2_targets, padding_mask=None):
        """Mean of the s1 and s2 cross entropies; padded positions (mask 1) are ignored."""
        if padding_mask is not None:
            keep = ~padding_mask.bool()
            s1_logits, s2_logits = s1_logits[keep], s2_logits[keep]
            s1_targets, s2_targets = s1_targets[keep], s2_targets[keep]
        ce_s1 = F.cross_entropy(s1_logits.reshape(-1, self.vocab_s1), s1_targets.reshape(-1))
        ce_s2 = F.cross_entropy(s2_logits.reshape(-1, self.vocab_s2), s2_targets.reshape(-1))
        return (ce_s1 + ce_s2) / 2, ce_s1, ce_s2

    def forward(self, x):
        return self.proj_s1(x)

    def cond_forward(self, x2):
        return self.proj_s2(x2)


class Kronos(nn.Module, HubMixin):
    """Decoder-only predictor over (s1, s2) token pairs plus calendar stamps."""

    config_keys = (
        "s1_bits", "s2_bits", "n_layers", "d_model", "n_heads", "ff_dim", "ffn_dropout_p", "attn_dropout_p",
        "resid_dropout_p", "token_dropout_p", "learn_te",
    )

    def __init__(self, s1_bits, s2_bits, n_layers, d_model, n_heads, ff_dim, ffn_dropout_p, attn_dropout_p,
                 resid_dropout_p, token_dropout_p, learn_te):
        super().__init__()
        _check_heads("Kronos", d_model, n_heads)
        _check_heads("Kronos dependency layer (4 heads)", d_model, 4)
        _check_bits("Kronos", s1_bits, s2_bits)
        self.config = {k: v for k, v in locals().items() if k in self.config_keys}
        self.s1_bits, self.s2_bits, self.d_model = s1_bits, s2_bits, d_model
        self.s1_vocab_size = 2**s1_bits

        self.embedding = HierarchicalEmbedding(s1_bits, s2_bits, d_model)
        self.time_emb = TemporalEmbedding(d_model, learn_te)
        self.token_drop = nn.Dropout(token_dropout_p)
        self.transformer = nn.ModuleList([
            TransformerBlock(d_model, n_heads, ff_dim, ffn_dropout_p, attn_dropout_p, resid_dropout_p)
            for _ in range(n_layers)
        ])
        self.norm = RMSNorm(d_model)
        self.dep_layer = DependencyAwareLayer(d_model)
        self.head = DualHead(s1_bits, s2_bits, d_model)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0, std=self.d_model**-0.5)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def trunk(self, s1_ids, s2_ids, stamp=None, padding_mask=None, caches: list[KVCache] | None = None):
        """Embeddings -> causal blocks -> final norm: the hidden states (B, T, d_model)."""
        x = self.embedding([s1_ids, s2_ids])
        if stamp is not None:
            x = x + self.time_emb(stamp)
        x = self.token_drop(x)
        return self.norm(run_blocks(self.transformer, x, key_padding_mask=padding_mask, caches=caches))

    def forward(self, s1_ids, s2_ids, stamp=None, padding_mask=None, use_teacher_forcing=False, s1_targets=None):
        """(s1_logits, s2_logits). s2 is conditioned on s1_targets (teacher forcing) or on an s1 sampled from
        the model's own s1 distribution (the original's default)."""
        x = self.trunk(s1_ids, s2_ids, stamp, padding_mask)
        s1_logits = self.head(x)
        if use_teacher_forcing:
            sibling_embed = self.embedding.emb_s1(s1_targets)
        else:
            probs = F.softmax(s1_logits.detach().float(), dim=-1)
            sampled = torch.multinomial(probs.view(-1, self.s1_vocab_size), 1).view(s1_ids.shape)
            sibling_embed = self.embedding.emb_s1(sampled)
        x2 = self.dep_layer(x, sibling_embed, key_padding_mask=padding_mask)
        return s1_logits, self.head.cond_forward(x2)

    def decode_s1(self, s1_ids, s2_ids, stamp=None, padding_mask=None):
        """(s1_logits for every position, hidden states used as the context of decode_s2)."""
        x = self.trunk(s1_ids, s2_ids, stamp, padding_mask)
        return self.head(x), x

    def decode_s2(self, context, s1_ids, padding_mask=None):
        """s2 logits for every context position, conditioned on s1_ids (B, T) or (B, 1)."""
        x2 = self.dep_layer(context, self.embedding.emb_s1(s1_ids), key_padding_mask=padding_mask)
        return self.head.cond_forward(x2)


def check_pair(tokenizer: KronosTokenizer, model: Kronos) -> None:
    """A predictor consumes the tokenizer's ids, so their bit widths must agree."""
    if (tokenizer.s1_bits, tokenizer.s2_bits) != (model.s1_bits, model.s2_bits):
        raise ValueError(
            f"tokenizer and predictor do not match: tokenizer has s1_bits={tokenizer.s1_bits}, "
            f"s2_bits={tokenizer.s2_bits} but the predictor expects s1_bits={model.s1_bits}, "
            f"s2_bits={model.s2_bits}; load the tokenizer the predictor was trained with "
            "(Kronos-mini: Kronos-Tokenizer-2k; Kronos-small/base: Kronos-Tokenizer-base)"
        )
