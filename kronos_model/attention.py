"""Attention kernels and the key/value cache used when generating.

`KVCache` keeps the rotated keys and values of one attention layer. When all sample paths of a series share a
look-back prefix, a `shared` cache keeps that prefix once per series instead of once per path; `read` then
scores every path's queries against the shared prefix with one batched matmul per series and against the
path's own suffix separately. A generation step is memory-bound on CPU, so reading the prefix once instead
of S times is what matters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unblock_empty_rows(allowed: torch.Tensor) -> torch.Tensor:
    """A query with no visible key (a padded position) would give NaN; let it see everything instead, since
    its output is ignored anyway."""
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def attention_mask(
    q_len: int, k_len: int, device: torch.device, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, bool]:
    """Causal mask for queries that are the last `q_len` of `k_len` keys, plus an optional key padding mask.

    Returns (attn_mask, is_causal) for scaled_dot_product_attention; the fast built-in causal path is used
    whenever it is exact (queries and keys aligned, no padding).
    """
    if padding_mask is None:
        if q_len == k_len:
            return None, True
        if q_len == 1:
            return None, False  # the newest token may see every key
    past = k_len - q_len
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=past)
    if padding_mask is not None:
        # padding_mask: (B, k_len), 1/True = padding; pads never serve as keys.
        allowed = unblock_empty_rows(allowed[None, None] & ~padding_mask.bool()[:, None, None, :])
    return allowed, False


def attention(q, k, v, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
    """scaled_dot_product_attention, except for one unmasked query per row (a generation step), where two
    small matmuls beat the fused CPU kernel's fixed cost."""
    if q.shape[-2] == 1 and mask is None and dropout_p == 0.0:
        weights = torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class KVCache:
    """Rotated keys and values of one attention layer for the tokens seen so far, preallocated to capacity."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0  # tokens seen, shared prefix included (the next token's position)
        self.keys: torch.Tensor | None = None  # own tokens (after the shared prefix), (rows, H, capacity, d)
        self.values: torch.Tensor | None = None
        self.prefix_keys: torch.Tensor | None = None  # (rows / paths, H, prefix, d), shared by `paths` rows
        self.prefix_values: torch.Tensor | None = None
        self.paths = 1

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; returns this cache's own keys and values so far (not the shared prefix)."""
        batch, heads, new, head_dim = k.shape
        if self.keys is None:
            room = self.capacity - self.prefix_length
            self.keys = k.new_empty(batch, heads, room, head_dim)
            self.values = v.new_empty(batch, heads, room, head_dim)
        start = self.length - self.prefix_length
        end = start + new
        if end > self.keys.shape[-2]:
            raise RuntimeError(f"KV cache overflow: {self.length + new} tokens > capacity {self.capacity}")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length += new
        return self.keys[:, :, :end], self.values[:, :, :end]

    @classmethod
    def shared(cls, keys: torch.Tensor, values: torch.Tensor, paths: int, capacity: int) -> KVCache:
        """A cache whose first tokens, keys/values (series, H, prefix, d), are shared by `paths` consecutive rows
        each; tokens appended later are per row, up to `capacity` tokens in all."""
        if keys.shape[-2] > capacity:
            raise RuntimeError(f"KV cache overflow: a prefix of {keys.shape[-2]} tokens > capacity {capacity}")
        cache = cls(capacity)
        cache.prefix_keys, cache.prefix_values, cache.paths = keys, values, paths
        cache.length = keys.shape[-2]
        return cache

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' k/v, then causal attention of their queries over everything cached."""
        self.append(k, v)
        return self.read(q)

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of queries that stand for the newest q_len cached tokens over everything cached (causal
        among those; a single query sees every key)."""
        new = q.shape[-2]
        own = self.length - self.prefix_length
        keys = values = None
        if own:
            keys, values = self.keys[:, :, :own], self.values[:, :, :own]
        if self.prefix_keys is None:
            mask, is_causal = attention_mask(new, own, q.device, None)
            return attention(q, keys, values, mask, is_causal, 0.0)
        rows, heads, _, dim = q.shape
        groups, paths, prefix = rows // self.paths, self.paths, self.prefix_length

        def by_group(x: torch.Tensor) -> torch.Tensor:  # (rows, H, new, *) -> (groups, H, paths * new, *)
            return x.reshape(groups, paths, heads, new, -1).transpose(1, 2).reshape(groups, heads, paths * new, -1)

        def by_row(x: torch.Tensor) -> torch.Tensor:  # the inverse
            return x.reshape(groups, heads, paths, new, -1).transpose(1, 2).reshape(rows, heads, new, -1)

        scores = by_row(by_group(q) @ self.prefix_keys.transpose(-1, -2))
        if keys is not None:
            scores_own = q @ keys.transpose(-1, -2)
            if new > 1:  # causal among the new tokens; the prefix and earlier tokens are all visible
                visible = torch.ones(new, own, dtype=torch.bool, device=q.device).tril(own - new)
                scores_own = scores_own.masked_fill(~visible, float("-inf"))
            scores = torch.cat([scores, scores_own], dim=-1)
        weights = torch.softmax(scores * dim**-0.5, dim=-1)
        out = by_row(by_group(weights[..., :prefix]) @ self.prefix_values)
        return out if values is None else out + weights[..., prefix:] @ values
