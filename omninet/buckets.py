"""Length buckets: a small fixed set of padded lengths that variable-length inputs round up to.

    buckets = default_buckets(512)          # [16, 32, 64, 128, 256, 512]
    n = bucket_for(len(ids), buckets)       # the smallest bucket that holds the sequence
    input_ids, attention_mask = pad_to_bucket([ids_a, ids_b], n, pad_id=0)

Serving groups requests by bucket so a batch pads to its bucket, not to its longest request,
and a static-shape compiler sees only ``len(buckets)`` shapes. Padding goes after each row's
end with ``attention_mask`` False there, so any kernel that masks padding gives the unpadded
outputs (within float tolerance). B batch, N bucket length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MIN_BUCKET", "default_buckets", "bucket_for", "pad_to_bucket"]

MIN_BUCKET = 16  # below this, padding costs less than the extra shape


def default_buckets(max_len: int) -> list[int]:
    """Powers of two from ``MIN_BUCKET`` below ``max_len``, then ``max_len`` itself."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    out, n = [], MIN_BUCKET
    while n < max_len:
        out.append(n)
        n *= 2
    return out + [max_len]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= n``; ValueError when ``n`` exceeds the last (largest) bucket."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket ({buckets[-1]}): a sequence of {n} tokens is longer than "
                     f"the largest shape bucket; add a bucket >= {n} (at most max_seq_length) or truncate")


def pad_to_bucket(sequences: Sequence[Sequence[int]], bucket: int, *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Id sequences -> ``input_ids`` LongTensor [B, bucket] (``pad_id`` after each row's end)
    and ``attention_mask`` BoolTensor [B, bucket] (True on real tokens)."""
    if not sequences:
        raise ValueError("pad_to_bucket needs at least one sequence")
    longest = max(len(s) for s in sequences)
    if longest > bucket:
        raise ValueError(f"a sequence of {longest} tokens does not fit bucket {bucket}")
    input_ids = torch.full((len(sequences), bucket), pad_id, dtype=torch.long)  # [B, N]
    attention_mask = torch.zeros((len(sequences), bucket), dtype=torch.bool)  # [B, N]
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = True
    return input_ids, attention_mask
