"""Static-shape buckets: pad every input to the next of a few fixed lengths, so a compiler that
specializes on shapes (``torch.compile(dynamic=False)`` on CPU/GPU, XLA on TPU, where every new
shape is a new program) builds at most one graph per bucket instead of one per length.

    buckets = default_buckets(model.config.max_seq_length)      # [16, 32, 64, ..., max_len]
    model = BucketedModel(model, buckets, compile=True)          # pads, masks, crops back
    out = model(input_ids, attention_mask=mask)                  # == the unpadded forward

Padding is masked (``attention_mask`` False on the added positions, ``labels`` -100 there), so
real tokens attend to exactly what they did before and per-token outputs are cropped back to
the input length: outputs equal the unpadded ones within float tolerance (pooled classifier
logits too: pooling honours the mask). ``compile_static`` compiles each transformer stack in
place (``nn.Module.compile``; state-dict keys unchanged) with ``dynamic=False`` and a recompile
limit of one graph per bucket; the embedding and validation stay eager, so the stacks have no
graph breaks and the graph count is exactly the number of buckets used (per stack).

Dimensions: B batch, N input length, Nb its bucket (N <= Nb), C hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from omninet.buckets import bucket_for, default_buckets  # one definition, shared with serving
from omninet.model import Stack

__all__ = ["default_buckets", "bucket_for", "check_buckets", "pad_batch", "BucketedModel", "compile_static"]


def check_buckets(buckets: Sequence[int], max_seq_length: int, *, where: str = "shape_buckets") -> list[int]:
    """The buckets as a list, or a one-line ValueError naming ``where`` and the fix."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
        raise ValueError(f"{where} must be a non-empty list of lengths such as {default_buckets(max_seq_length)}, "
                         f"got {buckets!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
        raise ValueError(f"{where} must hold positive integers, got {list(buckets)}")
    if any(b >= c for b, c in zip(buckets, buckets[1:])):
        raise ValueError(f"{where}={list(buckets)} must be strictly increasing; sort them and drop duplicates, "
                         f"e.g. {sorted(set(buckets))}")
    if buckets[-1] > max_seq_length:
        raise ValueError(f"{where}={list(buckets)} goes above max_seq_length={max_seq_length}; use buckets "
                         f"<= {max_seq_length} (e.g. {default_buckets(max_seq_length)}) or raise max_seq_length")
    return list(buckets)


def _pad(t: torch.Tensor, to: int, value) -> torch.Tensor:
    """Pads dim 1 of t (B, N, ...) to ``to`` with ``value``."""
    extra = to - t.shape[1]
    if extra == 0:
        return t
    shape = (t.shape[0], extra, *t.shape[2:])
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=1)


def pad_batch(batch: dict, buckets: Sequence[int], *, pad_id: int = 0, length_key: str = "input_ids") -> dict:
    """A copy of ``batch`` (model keyword arguments) padded along the sequence to its bucket:
    ``input_ids`` with ``pad_id``, ``hidden_states``/``inputs_embeds`` with zeros,
    ``attention_mask`` with False (created, all True on the real tokens, if absent), per-token
    ``labels`` with -100. Adds nothing else; a 4-D mask is refused."""
    key = next((k for k in (length_key, "input_ids", "hidden_states", "inputs_embeds") if k in batch), None)
    if key is None:
        raise ValueError("pad_batch: the batch has no input_ids, hidden_states or inputs_embeds to pad")
    x = batch[key]
    B, N = x.shape[:2]
    Nb = bucket_for(N, buckets)
    out = dict(batch)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("static-shape buckets pad a [B, N] padding attention_mask; pass one instead of a "
                         f"{mask.dim()}-D mask, or turn shape_buckets off")
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
    out["attention_mask"] = _pad(mask.bool(), Nb, False)
    for k, value in (("input_ids", pad_id), ("hidden_states", 0.0), ("inputs_embeds", 0.0)):
        if k in batch and batch[k] is not None:
            out[k] = _pad(batch[k], Nb, value)
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        out["labels"] = _pad(labels, Nb, -100)
    return out


def _crop(x, N: int, Nb: int):
    """Per-token tensors (B, Nb, C|V) back to (B, N, C|V); attention maps (B, H, Nb, Nb) to
    (B, H, N, N); anything else unchanged."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 4 and x.shape[-1] == Nb and x.shape[-2] == Nb:
            return x[..., :N, :N]
        if x.dim() >= 3 and x.shape[1] == Nb:  # (B, Nb, C|V); pooled (B, classes) logits are left alone
            return x[:, :N]
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_crop(v, N, Nb) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _crop(getattr(x, f.name), N, Nb) for f in dataclasses.fields(x)
                                         if f.name not in ("loss", "aux_loss", "cache")})
    return x


def compile_static(model: nn.Module, buckets: Sequence[int], *, backend="inductor", **options) -> nn.Module:
    """Compiles every transformer stack of ``model`` in place with ``dynamic=False`` (one graph
    per bucket; on XLA pass ``backend='openxla'``). Returns ``model``."""
    import torch._dynamo  # heavy: torch._dynamo (~1.5 s), needed only to compile

    stacks = [m for m in model.modules() if isinstance(m, Stack)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no omninet Stack to compile")
    limit = max(len(buckets) + 1, torch._dynamo.config.recompile_limit)  # +1: a train/eval switch is a guard too
    torch._dynamo.config.recompile_limit = limit
    for s in stacks:
        s.compile(backend=backend, dynamic=False, **options)
    return model


class BucketedModel(nn.Module):
    """``model`` behind static-shape buckets: each call is padded to its bucket, run, and
    cropped back. ``compile=True`` compiles the stacks (``compile_static``). Works for
    ``OmniNetModel`` (``input_ids``/``inputs_embeds``) and the seed ``AdvancedTransformer``
    (``hidden_states``). KV-cached decoding is not bucketed (one token at a time)."""

    def __init__(self, model: nn.Module, buckets: Sequence[int] | None = None, *, compile: bool = False,
                 backend="inductor", **compile_options):
        super().__init__()
        max_len = model.config.max_seq_length
        self.model = model
        self.buckets = check_buckets(default_buckets(max_len) if buckets is None else buckets, max_len)
        self.pad_id = getattr(model.config, "pad_token_id", 0) or 0
        if compile:
            compile_static(model, self.buckets, backend=backend, **compile_options)

    def forward(self, *args, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("use_cache"):
            return self.model(*args, **kwargs)
        if args:  # the first positional argument is the input (input_ids or hidden_states)
            name = "hidden_states" if args[0].is_floating_point() else "input_ids"
            kwargs = {name: args[0], **kwargs}
            args = args[1:]
        key = next(k for k in ("input_ids", "hidden_states", "inputs_embeds") if kwargs.get(k) is not None)
        N = kwargs[key].shape[1]
        keep = kwargs.pop("logits_to_keep", 0)
        padded = pad_batch({k: v for k, v in kwargs.items()}, self.buckets, pad_id=self.pad_id, length_key=key)
        Nb = padded[key].shape[1]
        if keep and Nb != N:  # the padding sits after the last n real positions: keep it too, then drop it
            out = _crop(self.model(*args, **padded, logits_to_keep=keep + Nb - N), N, Nb)
            return dataclasses.replace(out, logits=out.logits[:, :keep])
        out = self.model(*args, **padded, **({"logits_to_keep": keep} if keep else {}))
        return _crop(out, N, Nb) if Nb != N else out
