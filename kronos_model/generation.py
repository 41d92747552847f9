"""Autoregressive token generation with a key/value cache: the engine behind KronosPredictor.

Semantics are the original `auto_regressive_inference` (eval mode): the model at step i sees the last
W = min(lookback + i, max_context) tokens with rotary positions 0..W-1, and the stamps of those input bars.
What changes is how much is computed:

1. While the whole sequence fits in `max_context`, positions never move, so each step feeds only the newest
   token through the trunk against cached keys/values (the original re-runs the whole window every step).
   The dependency layer's keys/values (its rotation is the identity at inference) are cached the same way,
   and s1/s2 heads run on the last position only.
2. The look-back prefix is identical for all sample paths of a series, so it is computed once per series and
   its cache is shared by the S paths (the original computes it S times), the dependency layer's keys/values
   of it too. On a CPU the look-backs of a batch run a few series at a time (`PREFILL_SERIES_CPU`): the pass
   is compute-bound, and smaller activations stay in the CPU's caches.
3. Past `max_context` the window slides and positions restart at 0, so every hidden state changes and
   nothing can be reused from the previous step: each step re-runs the window, as the original does. We still
   run the part of the window that is look-back history once per series instead of once per path, and the
   heads on the last position only. Cost per sliding step: (W - g) tokens x B series + g tokens x B·S paths,
   where g = generated tokens inside the window, against W x B·S in the original.
4. The final tokenizer decode shares the look-back prefix the same way.

All S paths of all B series run as one batch. Sampling can still be per series: with one generator per series
(`generators`), each series' S uniform draws come from its own generator, so a series forecast inside a batch
draws exactly what it draws alone with the same seed (filtering and sampling are row-wise, so its rows see the
same probabilities). A single `generator` is one random stream for the whole batch, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kronos_model.attention import KVCache
from kronos_model.model import Kronos, KronosTokenizer

PREFILL_SERIES_CPU = 4
CANDIDATES = (32, 160)  # how many tokens are looked at first, then; a row whose nucleus is wider is sorted in full


def _nucleus(logits: torch.Tensor, log_total: torch.Tensor, top_p: float,
             take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `take` tokens of each row, best first: (ids, probability of each token in the nucleus, 0 past
    it). `log_total`: each row's log normaliser (over its top_k tokens, or all). A token is in the nucleus while
    the mass before it is at most top_p, so the best token always is."""
    values, ids = torch.topk(logits, take, dim=-1)
    probs = (values - log_total).exp()
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)
    return ids, probs


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One id per row of `logits` (R, V) from temperature, top_k and top_p together (the original returned after
    top-k and silently ignored top_p), by inverting each row's cumulative distribution at its uniform draw
    `uniforms` (R,). Row-wise: a row comes out the same whatever other rows share the call.

    Why not torch.multinomial: it draws V exponentials per row (the Gumbel trick), and with one generator per
    series that was half of a batched tiny-model forecast; one uniform per row is the same distribution. The
    nucleus is looked for among the best CANDIDATES[0] tokens, then more for the rows whose nucleus is wider."""
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    allowed = vocab if top_k <= 0 else min(top_k, vocab)
    # without top_p every allowed token is in the nucleus: no point looking at candidates first
    ladder = [allowed] if top_p >= 1.0 else [n for n in CANDIDATES if n < allowed] + [allowed]
    pool = logits if allowed == vocab else torch.topk(logits, allowed, dim=-1).values
    log_total = torch.logsumexp(pool, dim=-1, keepdim=True)
    if not torch.isfinite(log_total).all():
        raise ValueError("the model's logits are not finite (NaN or infinite): the checkpoint or its input is broken")
    sampled = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    rows = torch.arange(logits.shape[0], device=logits.device)
    for take in ladder:
        ids, probs = _nucleus(logits[rows], log_total[rows], top_p, take)
        # a row's nucleus is known once a candidate was dropped (or every allowed token was looked at)
        known = probs[:, -1] == 0 if take < allowed else torch.ones_like(probs[:, -1], dtype=torch.bool)
        sampled[rows[known]] = _invert(ids[known], probs[known], uniforms[rows[known]])
        rows = rows[~known]
        if not rows.numel():
            break
    return sampled


def _invert(ids: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cumulative = probs.cumsum(dim=-1)
    target = (uniforms.to(cumulative.dtype) * cumulative[:, -1]).unsqueeze(-1)
    position = torch.searchsorted(cumulative, target, right=True).clamp_(max=ids.shape[-1] - 1)
    return ids.gather(-1, position).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one id per row of `logits` (R, V); temperature <= 0 or top_k == 1 is greedy (argmax)."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1)
    uniforms = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    return sample_rows(logits, temperature, top_k, top_p, uniforms)


def sample_per_series(
    logits: torch.Tensor,
    paths: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: Sequence[torch.Generator] | torch.Generator | None,
) -> torch.Tensor:
    """Sample rows (B·S, V) where each consecutive block of `paths` rows is one series: with a sequence of B
    generators, block b's uniforms come from generators[b] alone (what the series would draw in a batch of its
    own); the filtering and the draws run once for all rows."""
    if generators is None or isinstance(generators, torch.Generator) or temperature <= 0 or top_k == 1:
        return sample_tokens(logits, temperature, top_k, top_p, generators)  # one stream, or greedy (no draws)
    if logits.shape[0] != paths * len(generators):
        raise ValueError(f"{len(generators)} generators for {logits.shape[0] // paths} series")
    uniforms = torch.cat([torch.rand(paths, generator=generator, device=logits.device) for generator in generators])
    return sample_rows(logits, temperature, top_k, top_p, uniforms)


@dataclass
class Generated:
    s1: torch.Tensor  # (B, S, P) generated coarse ids
    s2: torch.Tensor  # (B, S, P) generated fine ids
    values: torch.Tensor  # (B, S, P, d_in) decoded, still normalised
    last_reconstruction: torch.Tensor | None = None  # (B, d_in) the last look-back candle as the tokenizer sees it


def _new_caches(n: int, capacity: int) -> list[KVCache]:
    return [KVCache(capacity) for _ in range(n)]


def series_chunks(batch: int, device: torch.device) -> list[slice]:
    """The series of each look-back pass: on a CPU a few at a time keep the activations in cache (measured: the
    trunk's prefill of 32 Kronos-small look-backs of 400 takes 7.0 s in one pass, 4.4 s four at a time); an
    accelerator takes the whole batch at once."""
    size = PREFILL_SERIES_CPU if device.type == "cpu" else batch
    return [slice(first, first + size) for first in range(0, batch, size)]


def prefill_shared(step, chunks: list[slice], n_caches: int, prefix: int, capacity: int,
                   paths: int) -> tuple[list, list[KVCache]]:
    """Run `step(series, caches)` over each chunk of series' shared look-backs (`prefix` tokens), each chunk into
    caches of its own; returns the steps' outputs and `n_caches` caches holding every series' look-back once,
    shared by its `paths` rows (see KVCache.shared), with room for `capacity` tokens."""
    outputs, per_chunk = [], []
    for series in chunks:
        caches = _new_caches(n_caches, prefix)
        outputs.append(step(series, caches))
        per_chunk.append(caches)
    return outputs, [KVCache.shared(torch.cat([caches[i].keys for caches in per_chunk]),
                                    torch.cat([caches[i].values for caches in per_chunk]), paths, capacity)
                     for i in range(n_caches)]


@torch.inference_mode()
def generate(
    tokenizer: KronosTokenizer,
    model: Kronos,
    x: torch.Tensor,
    x_stamp: torch.Tensor,
    y_stamp: torch.Tensor,
    max_context: int,
    pred_len: int,
    sample_count: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.9,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    verbose: bool = False,
) -> Generated:
    """Forecast `pred_len` bars for B normalised series x (B, N, d_in), S = sample_count paths each.

    `generator`: None (torch's global RNG), one generator for the whole batch, or B generators, one per series
    (each series then samples as it would alone; see the module docstring)."""
    batch, lookback, _ = x.shape
    paths, rows = sample_count, batch * sample_count
    if not 1 <= pred_len <= max_context:
        raise ValueError(f"pred_len must be between 1 and max_context ({max_context}), got {pred_len}")
    chunks = series_chunks(batch, x.device)
    ids = [tokenizer.encode(x[series], half=True) for series in chunks]  # the tokenizer sees the full look-back
    hist_s1, hist_s2 = torch.cat([s1 for s1, _ in ids]), torch.cat([s2 for _, s2 in ids])  # (B, N) each
    stamps = torch.cat([x_stamp, y_stamp], dim=1)  # (B, N + P, 5)
    path_stamps = stamps.repeat_interleave(paths, dim=0)
    gen_s1 = torch.zeros(rows, pred_len, dtype=torch.long, device=x.device)
    gen_s2 = torch.zeros_like(gen_s1)
    dep = model.dep_layer
    n_layers = len(model.transformer)
    capacity = min(max_context, lookback + pred_len)  # the longest window any step holds

    caches: list[KVCache] | None = None
    dep_cache = KVCache(capacity)  # the dependency layer's keys/values of the window's trunk states
    for i in tqdm(range(pred_len), desc="forecast", disable=not verbose, leave=False):
        known = lookback + i
        if caches is not None and known <= max_context:
            # Positions are stable: push the token sampled last step through the cached trunk.
            last = model.trunk(gen_s1[:, i - 1 : i], gen_s2[:, i - 1 : i],
                               path_stamps[:, known - 1 : known], caches=caches)
            dep_cache.append(*dep.cross_attn.project_kv(last, last))
        else:
            # (Re)build the window: history part once per series, generated part per path.
            window = min(known, max_context)
            generated = min(i, window)
            prefix = window - generated
            start = known - window
            if prefix:
                def history(series: slice, chunk_caches: list[KVCache], prefix=prefix, start=start):
                    hidden = model.trunk(hist_s1[series, lookback - prefix :], hist_s2[series, lookback - prefix :],
                                         stamps[series, start : start + prefix], caches=chunk_caches)
                    return (hidden[:, -1:], *dep.cross_attn.project_kv(hidden, hidden))

                outputs, caches = prefill_shared(history, chunks, n_layers, prefix, capacity, paths)
                lasts, dep_keys, dep_values = (torch.cat(part) for part in zip(*outputs, strict=True))
                last = lasts.repeat_interleave(paths, dim=0)
                dep_cache = KVCache.shared(dep_keys, dep_values, paths, capacity)
            else:
                caches, dep_cache = _new_caches(n_layers, capacity), KVCache(capacity)
            if generated:
                hidden = model.trunk(gen_s1[:, i - generated : i], gen_s2[:, i - generated : i],
                                     path_stamps[:, known - generated : known], caches=caches)
                dep_cache.append(*dep.cross_attn.project_kv(hidden, hidden))
                last = hidden[:, -1:]
        s1 = sample_per_series(model.head(last[:, 0]), paths, temperature, top_k, top_p, generator)
        attn = dep.cross_attn.attend_cached(model.embedding.emb_s1(s1)[:, None], dep_cache)
        s2_logits = model.head.cond_forward(dep.norm(last + attn))[:, 0]
        s2 = sample_per_series(s2_logits, paths, temperature, top_k, top_p, generator)
        gen_s1[:, i], gen_s2[:, i] = s1, s2

    values, last_reconstruction = decode_forecast(tokenizer, hist_s1, hist_s2, gen_s1, gen_s2, max_context, paths)
    shape = (batch, paths, pred_len)
    return Generated(gen_s1.view(shape), gen_s2.view(shape), values.view(*shape, -1), last_reconstruction)


def decode_forecast(tokenizer, hist_s1, hist_s2, gen_s1, gen_s2, max_context: int,
                    paths: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode the last min(N + P, max_context) tokens of each path, as the original does, and keep the last P;
    with the tokenizer's reconstruction of the last look-back candle, (B, d_in), when that window holds any
    look-back (what anchoring subtracts: predictor.reconstruction_offset computes the same thing on its own).

    The look-back part of that window is the same for every path of a series, so it runs once per series.
    """
    batch, lookback = hist_s1.shape
    pred_len = gen_s1.shape[1]
    prefix = min(lookback + pred_len, max_context) - pred_len
    last_reconstruction = None
    if prefix:
        code = tokenizer.indices_to_bits([hist_s1[:, -prefix:], hist_s2[:, -prefix:]], half=True)
        outputs, caches = prefill_shared(
            lambda series, chunk_caches: tokenizer.decode_code(code[series], caches=chunk_caches)[:, -1],
            series_chunks(batch, hist_s1.device), len(tokenizer.decoder), prefix, prefix + pred_len, paths)
        last_reconstruction = torch.cat(outputs)
    else:
        caches = _new_caches(len(tokenizer.decoder), pred_len)
    code = tokenizer.indices_to_bits([gen_s1, gen_s2], half=True)
    return tokenizer.decode_code(code, caches=caches), last_reconstruction
