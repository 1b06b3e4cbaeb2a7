"""
Selecting blocks with ``prism.reference``, stage by stage
==========================================================

:func:`prism.reference.select_blocks` is five small stages. This tutorial
runs them one at a time on a head with a known structure, looks at every
intermediate, and checks that the stages put together give the same mask as
the one-call API.

The head has three ingredients that real attention heads show:

* an **attention sink** and vertical stripes, carried by slow RoPE pairs;
* a **slash**: each query attends to the keys 384 tokens behind it, a pure
  relative-position pattern carried by fast RoPE pairs;
* slowly varying content, and noise.
"""

# %%
# A structured head
# -----------------
# :func:`prism.theory.synthetic_positional_head` builds queries and keys
# after RoPE (base 5e5, head dim 128, 2048 tokens) whose attention has a
# slash 384 tokens below the diagonal, carried by the fast RoPE pairs, plus
# a sink and vertical stripes carried by the slow pairs.

import matplotlib.pyplot as plt
import torch

from prism.reference import (
    PrismConfig,
    admissible_tiles,
    band_dims,
    band_logits,
    band_probabilities,
    band_temperature,
    forced_tiles,
    pool_tiles,
    select_blocks,
    tile_layout,
    top_p_select,
)
from prism.theory import synthetic_positional_head

head = synthetic_positional_head(base=5e5)
q, k = head.q.float(), head.k.float()
N, D = q.shape[2], q.shape[3]
fast, slow = head.slash_pairs, head.vertical_pairs
# The two dims of pair m are (m, m + D/2) in the default "half" layout.
fast = torch.tensor([d for m in fast for d in (m, m + D // 2)])
slow = torch.tensor([d for m in slow for d in (m, m + D // 2)])
print(q.shape, k.shape)

# %%
# Stage 1: the tile grid and mean pooling (contract §3)
# -----------------------------------------------------
# With ``Nq == Nk`` the queries start at position 0. Each tile's pooled vector
# is the mean of the tokens it holds, accumulated in fp32.

cfg = PrismConfig(block_size=128)
layout = tile_layout(N, N, cfg.block_size, causal=True)
q_pooled = pool_tiles(q, layout.query_start, cfg.block_size)
k_pooled = pool_tiles(k, 0, cfg.block_size)
print(layout)
print("pooled:", tuple(q_pooled.shape), q_pooled.dtype)

# %%
# Pooling keeps the slow pairs and nearly erases the fast ones: the slash
# lives in pairs that rotate by up to one radian per token, and 128 of those
# rotations average to almost nothing.

energy = lambda x, dims: x[..., dims].pow(2).mean().sqrt().item()
print(f"fast-pair RMS: tokens {energy(q, fast):.3f} -> pooled {energy(q_pooled, fast):.3f}")
print(f"slow-pair RMS: tokens {energy(q, slow):.3f} -> pooled {energy(q_pooled, slow):.3f}")

# %%
# Stage 2: the two bands (contract §4)
# ------------------------------------

high_dims, low_dims = band_dims(D, cfg.high_dim, cfg.low_dim, cfg.rope_layout)
print("high band dims:", high_dims.tolist())
print("low band dims: ", low_dims.tolist())

# %%
# Stage 3: energy calibration (contract §5)
# -----------------------------------------
# Each band's temperature is its share of the pooled energy. The high band
# is weak after pooling, so its temperature is small, which sharpens its
# softmax back up.

high_tau = band_temperature(q_pooled, k_pooled, high_dims, cfg.eps)
low_tau = band_temperature(q_pooled, k_pooled, low_dims, cfg.eps)
print(f"tau_high = {high_tau.item():.4f}, tau_low = {low_tau.item():.4f}")

# %%
# Stage 4: band probabilities and top-p (contract §6)
# ---------------------------------------------------

admissible = admissible_tiles(layout, causal=True)
high_probs = band_probabilities(band_logits(q_pooled, k_pooled, high_dims, high_tau), admissible)
low_probs = band_probabilities(band_logits(q_pooled, k_pooled, low_dims, low_tau), admissible)
high_keep, _ = top_p_select(high_probs, admissible, cfg.high_threshold)
low_keep, _ = top_p_select(low_probs, admissible, cfg.low_threshold)

# %%
# Stage 5: union and forced tiles
# -------------------------------

forced = forced_tiles(layout, True, cfg.force_sink, cfg.force_diagonal)
mask = (high_keep | low_keep | forced) & admissible

assert torch.equal(mask, select_blocks(q, k, cfg)), "stages and API disagree"
density = mask.sum().item() / admissible.sum().item()
print(f"causal density: {density:.3f}")

# %%
# Look at it
# ----------
# Left to right: the token-level attention of the head (log scale), each
# band's probabilities, and the final mask. The slash sits 384 tokens (three
# tiles) below the diagonal; the sink and the stripes are columns.

scores = (q[0, 0] @ k[0, 0].T) / D**0.5
scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
attention = torch.softmax(scores, dim=-1)

fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
axes[0].imshow(attention.clamp_min(1e-6).log10(), cmap="magma", vmin=-6, vmax=0)
axes[0].set_title("token attention (log10)")
for ax, probs, name in ((axes[1], high_probs, "high band"), (axes[2], low_probs, "low band")):
    ax.imshow(probs[0, 0], cmap="viridis")
    ax.set_title(f"{name} probabilities")
axes[3].imshow(mask[0, 0], cmap="Greys")
axes[3].set_title(f"selected tiles (density {density:.2f})")
for ax in axes[1:]:
    ax.set_xlabel("key tile")
axes[1].set_ylabel("query tile")
fig.tight_layout()

# %%
# How much of the attention does the mask keep? The recall is the softmax
# mass that falls on selected tiles, averaged over queries.

tile_of = torch.arange(N) // cfg.block_size
token_mask = mask[0, 0][tile_of][:, tile_of]
recall = (attention * token_mask).sum(-1).mean().item()
print(f"attention recall: {recall:.3f}")

# %%
# Compact indices
# ---------------
# Kernels and FlexAttention read a mask as, per query tile, the number of
# selected key tiles and their ascending indices.

from prism.reference import mask_to_indices  # noqa: E402

num, idx = mask_to_indices(mask)
print("row 10:", num[0, 0, 10].item(), "tiles ->", idx[0, 0, 10, : num[0, 0, 10]].tolist())
