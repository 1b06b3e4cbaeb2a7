"""Bridges from Prism to other libraries.

* :mod:`prism.integrations.transformers` - Prism as a Hugging Face
  ``attn_implementation`` (``register``), built on
  :mod:`prism.integrations.stats` (optional per-call statistics) and
  :mod:`prism.integrations.masks` (decoding transformers' padding masks).
* :mod:`prism.integrations.flex` - a Prism tile mask as a
  ``torch.nn.attention.flex_attention.BlockMask`` (``to_block_mask``).
* :mod:`prism.integrations.masked_sdpa` - the tile mask expanded to tokens and
  run by ``torch.nn.functional.scaled_dot_product_attention``: contract §7's output
  computed densely, a fast stand-in for the reference on the CPU.

The submodules are imported on demand, so ``import prism.integrations`` pulls in
neither transformers nor FlexAttention.
"""

__all__ = ["flex", "masked_sdpa", "masks", "stats", "transformers"]
