"""Paged KV cache kernels: ragged paged attention, KV cache update, block copies.

`reference` holds the pure-JAX definitions every kernel is tested against;
`metadata.AttentionMetadata` is the batch description they all take.
"""
