"""Retrieval: trained two-tower models, item indexes, recommend / similar / search."""
