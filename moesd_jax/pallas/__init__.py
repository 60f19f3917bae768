"""Pallas kernels for MoE dispatch, TPU (Mosaic) and GPU (Triton) variants.

Import the submodules directly (their main functions share the module names):
``moesd_jax.pallas.ops`` (``expert_ffn``, ``expert_ffn_ref``, backend selection),
``.expert_gather`` (grouped SwiGLU over the active experts), ``.budgeted_dispatch``
(token->expert dispatch under an expert budget), ``.tuning`` (block-size tables).
"""
