"""Block-sparse attention whose compute and memory shrink with the layout's density.

Dimensions: B batch, H heads, Nq queries, Nk keys, D head dim, bs block size,
nb = ceil(Nk / bs) key blocks, c query blocks of a group, r rows of a query block (bs, or
fewer at the edges), L keys of a slab.

Layout (fixed per layer and seed, built once per length and cached; never redrawn per call).
Blocks are numbered by absolute position (block i holds positions [i*bs, (i+1)*bs)).

- Non-causal (encoders): query block i keeps ``budget = ceil((1 - sparsity_factor) * nb)``
  key blocks, picked in this order until the budget is met: itself, the ``global_blocks``
  leading blocks, ``local_blocks`` neighbours on each side (nearest first),
  ``random_blocks`` random blocks (BigBird style, drawn from ``seed``, the layer and the row),
  then the nearest remaining blocks (a wider window). The ``global_blocks`` leading *query*
  blocks attend to every key ("global rows").
- Causal (decoders): row i chooses among the blocks j <= i and keeps
  ``ceil((1 - sparsity_factor) * (i + 1))`` of them, in the same order. A row's blocks
  depend only on i (not on the length), so cached decoding equals recomputation. Rows
  i < max(global_blocks, ceil(min_seq_length / bs)) are dense causal rows ("prefix rows"),
  which is how sequences of at most ``min_seq_length`` tokens get plain dense attention.
- Non-causal sequences of at most ``min_seq_length`` keys use dense SDPA. At density 1.0
  every row keeps every block and the kernel is dense SDPA.
- Every query row sees at least one key (its own block comes first).

Computation (CPU and GPU): every query block (global and prefix rows too: their keys are
all blocks) is computed against its key blocks as *slabs*: maximal runs of consecutive key
blocks, cut at the chunk budget (``layout.chunk_bytes``, default ``CHUNK_BYTES``). A slab is a
strided view of k and v, so nothing is gathered or copied; consecutive query blocks whose
slabs are the same up to a fixed shift (a sliding window: shift bs; a global block: shift 0)
form one group and one kernel call per slab over (c, H, bs, D) (blocks first, so that the
kernel's outputs come back in the (N, H, D) order of the output and of dq, dk, dv). A query
block's partial softmaxes over its slabs are merged by log-sum-exp. A slab with no mask of its
own whose keys every block of the group reads (a global block; a one-block group) is one call
for all the batch rows that share a plan, (n, H, c * bs, D), still views. A sliding window's
dk, dv (its blocks' windows overlap) are summed by one ``index_add_``. A wide sliding window
(at least ``TILE_MIN_WINDOW`` blocks) runs in tiles of up to ``TILE_ROWS`` query rows (several
blocks) against the union of their windows, the tile's two edges masked per block (at most 15%
more pairs), since the CPU flash kernel's 16-row units cost it twice a dense tile's per pair. On CPU each slab is the fused flash
kernel (``_scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp); a
causal row's own block uses its top-left ``is_causal`` (square and aligned), so causal rows
need no mask. Elsewhere, or with dropout, each slab is eager math (dropout masks drawn from
a per-call seed, slab by slab). Training runs a custom ``autograd.Function`` that saves only
q, k, v, the output and the log-sum-exp and recomputes each slab's probabilities in
backward, as flash attention does; its per-slab dk, dv temporaries are what the budget
bounds. Extra memory beyond the O(N) output and log-sum-exp (and dq, dk, dv) is therefore
bounded by the budget and the same on every call (no persistent buffers). A bias that needs
gradients (learned relative positions) takes a traced per-block path (eager attention per
query block under autograd, which saves its scores). On CUDA, with no user mask, bias or
dropout, the kernel uses compiled FlexAttention with a ``BlockMask`` built once per layout
and length.

Masks. A key-padding mask (B|1, 1, 1, Nk), the [B, N] mask that the trial runner and the
server always pass, is folded into the plans per batch row (rows with the same padding share
one cached plan): key blocks that are all padding are left out, query blocks that are all
padding are zero rows with no kernel call, slabs end at the row's real length (end padding needs
no key mask; ``key_lengths``, which the model computes once at its entry; the sliding windows
that the length cuts stay one group, an exact sliding head plus one shared slab read from a
staircase of starts, see ``_clip_groups``), and a block that is only partly padding (a hole,
left padding) is a slab of its own under the key mask. No key past a row's length is read. An
all-True mask is no mask. General masks (B|1, H|1, Nq, Nk) are sliced per slab (the mask
itself is Nq x Nk, the caller's choice) with one query block per group, as are calls with a
bias. The lazy ``bias(q_pos, k_pos)`` is evaluated per slab (and sequence) for just its keys.
Cross-attention uses dense SDPA (a layout is defined over one sequence). ``need_weights``
returns the (B, H, Nq, Nk) weights of exactly this layout, materialized through the eager
reference (debugging only).

``state.dense_mask(nq, nk, causal=None)`` is the (Nq, Nk) bool mask that this kernel is
equivalent to: ``block_sparse(q, k, v, mask=m) == eager(q, k, v, mask=m & dense_mask)``
(``causal`` defaults to the layer's own, known to ``make_state``); with a mask,
``state.equivalent_mask(m, nq, nk)`` is the whole equivalent (it also drops the all-padding
query blocks, whose rows are zero).

Where sparsity pays on CPU (issue 25's padding suite, ``benchmarks/attention_kernels.py --suite
padding``: fp32, B=2, H=4, D=16, median of 21 interleaved runs after a warm-up, against SDPA
with the same mask; Intel Xeon with AVX512-BF16, no AMX, one pinned thread, quiet, load 0.9-1.7;
``benchmarks/results/attention_kernels_padding_1t.json``):
- Forward, N=1024 and 4096, block 16-128, sparsity 0.5-0.9: 0.14-0.98x SDPA's time, at most
  0.53x at sparsity >= 0.75 with a mask; an all-True or 25%-padded mask costs at most 1.08x the
  kernel's own unmasked time (an all-True cell, the unmasked computation itself: the noise; 1.17x
  for the padded rows before the staircase slabs of ``_clip_groups``).
- Forward+backward: N=1024: block 16 0.98x at 50% (1.20x before the tiles of ``_tile_groups``),
  0.56x at 85%; block 64 0.80x, 0.44x; with 25% padding on half the rows 0.38-0.79x. N=256:
  block 16 1.90x at 50%, 1.27x at 85%; block 64 1.56x, 1.00x (0.92x padded).
  Where sparsity cannot win on CPU: below 512 tokens at block 16-64 (N=256 is at best parity, at
  85% with block 64; an earlier A/B had N=512 at 0.66-1.21x). At N=256 only 46-62% of a
  forward+backward call is inside the flash kernel's own calls (``in_kernel_fraction`` in the
  suite; 67-84% at N=1024): the rest is Python, views, log-sum-exp merges and gradient sums,
  ~1-2 ms a call, and the calls themselves are no cheaper than dense: a (head, block) work unit of
  16 query rows costs the CPU flash kernel 3.0 ns a score pair forward and 6.1 backward, against
  1.6 and 2.9 for dense SDPA's own tiles (tiles only pay for windows of at least
  ``TILE_MIN_WINDOW`` blocks), and a call ~20-30 us beyond its pairs, while 50% sparsity with a
  global row and column still computes 53% of the pairs. Dense SDPA runs instead for
  N <= ``min_seq_length`` (default 1024, which covers all of these; it gives up the 0.38-0.98x at
  N=1024); do not set it below 512.
- Two threads (``--threads 2``, same machine, load 1.0-1.9): SDPA gains 1.01-2.78x from the second
  thread, block-sparse 0.79-2.69x, and 70 of the 88 ratios stay within 20% of their one-thread
  value (forward 29 of 36 at N=1024 and 30 of 36 at N=4096; forward+backward 6 of 8 at N=256 and
  5 of 8 at N=1024, the worst 1.40x). What does not split is ours but serial: only the flash calls
  (46-97% of a call, least at short N and small blocks) use the second thread, the Python between
  them does not.
"""

from __future__ import annotations

from omninet.attention.block_sparse.costs import block_sparse_memory, block_sparse_work
from omninet.attention.block_sparse.kernel import block_sparse_attention
from omninet.attention.block_sparse.layout import BlockSparseLayout, layer_is_causal, make_block_sparse_state
from omninet.attention.block_sparse.padding import key_lengths
from omninet.attention.block_sparse.plan import BACKWARD_BUDGETS, CHUNK_BYTES
from omninet.attention.registry import register_kernel

__all__ = ["BlockSparseLayout", "block_sparse_attention", "make_block_sparse_state", "layer_is_causal", "key_lengths",
           "block_sparse_work", "block_sparse_memory", "CHUNK_BYTES", "BACKWARD_BUDGETS"]

register_kernel("block_sparse", make_state=make_block_sparse_state, work=block_sparse_work,
                memory=block_sparse_memory)(block_sparse_attention)
