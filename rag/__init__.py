"""Retrieval-augmented generation with per-query SLAs.

Retrieval: ``corpus``, ``bm25``, ``embedder``, ``dense``, ``hybrid``, ``index``, ``retrieval``.
Agents and pipeline: ``agents``, ``answer_type``, ``text``, ``generation``, ``config``, ``cost``,
``pipeline``. SLA management: ``intent``, ``sla``, ``profiling``, ``service``. Serving:
``http`` (``POST /v1/rag/query``), ``cli`` (``sluice rag build-index``).
"""
