"""Evaluation: ranking metrics, the full-ranking leave-one-out protocol, baselines and `recsys evaluate`."""
