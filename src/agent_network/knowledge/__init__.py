"""Knowledge: documents -> chunks -> full-text index -> retrieval."""

from agent_network.knowledge.chunking import chunk_text, fts_query, search_terms

__all__ = ["chunk_text", "fts_query", "search_terms"]
