"""Datasets, the interaction pipeline, video/audio/title ingestion and the feature store."""
