"""Retrieval-augmented generation with per-query SLAs."""
