"""Attention kernels behind one signature, looked up by name.

Every kernel is a function::

    kernel(q, k, v, *, mask, bias, causal, scale, dropout_p, need_weights, state, key_padding)
        -> (out, weights | None)

Dimensions: B batch, H heads, Nq queries, Nk keys, D head dim.

- ``q`` (B, H, Nq, D); ``k``, ``v`` (B, H, Nk, D).
- ``mask``: bool, broadcastable to (B, H, Nq, Nk), True = may attend; or None.
- ``key_padding``: ``KeyPadding.of(mask)`` when ``mask`` is a key-padding mask (B|1, 1, 1, Nk),
  read once per forward by the model (each row's real length) and passed to every layer as a
  value; else None. A kernel that folds padding into its plans (block-sparse) reads it; the
  others ignore it (they have ``mask``).
- ``bias``: a callable ``bias(q_pos, k_pos) -> (H, len(q_pos), len(k_pos))`` float additive
  score bias (relative / ALiBi positions), evaluated lazily so a sparse kernel can ask for
  just the blocks it computes; or None.
- ``causal``: query i may see key j only if j <= i + (Nk - Nq) (bottom-right aligned, so a
  query decoded against a KV cache sees the whole past).
- Query i sits at key position ``Nk - Nq + i`` for the bias too.
- A query row with no visible key yields a zero output row and finite gradients (never NaN).
- ``state``: the kernel's own ``nn.Module`` (Linformer's projections, a block layout cache),
  built once per attention layer by the spec's ``make_state``; None for stateless kernels.
- ``weights`` (B, H, Nq, Nk) only when ``need_weights`` and the kernel forms them, else None.
  Kernels registered with ``forms_weights=False`` (sdpa) are swapped for eager when weights
  are asked for; the others return the weights they actually used (a sparse layout's, the
  Linformer's effective P·F).

A kernel's registration (``register_kernel``, ``omninet.attention.registry``) also carries its
facts: its per-layer memory cost (``memory``, summed by ``omninet.hardware.estimate_memory_mb``),
which models it fits (``supports_causal`` / ``supports_bias`` / ``supports_cross`` and a
``check_config`` hook, run at ``ModelConfig`` construction), the kernel its cross-attention
layers use instead (``cross_fallback``), and how a layer of it starts from a trained dense layer
(``from_dense``: its own weights, e.g. Linformer's E/F as a strided mean pool; ``describe``: its
parameters for the record), which is all a derived trial's kernel swap (``omninet.passes``) needs.

``eager`` is the reference every other kernel is tested against (tests/test_kernels.py
enrols every registered kernel automatically).
"""

from __future__ import annotations

from omninet.attention.block_sparse.padding import KeyPadding
from omninet.attention.registry import (
    KERNELS,
    AttentionMemory,
    KernelSpec,
    check_kernel_config,
    get_kernel,
    register_kernel,
)

__all__ = ["AttentionMemory", "KernelSpec", "KeyPadding", "KERNELS", "register_kernel", "get_kernel", "check_kernel_config"]

from omninet.attention import dense as _dense  # noqa: E402,F401  (registers eager, sdpa)
from omninet.attention import block_sparse as _block_sparse  # noqa: E402,F401  (registers block_sparse)
from omninet.attention import linformer as _linformer  # noqa: E402,F401  (registers linformer)
from omninet.attention import hybrid as _hybrid  # noqa: E402,F401  (registers hybrid: the seed's two flags)
