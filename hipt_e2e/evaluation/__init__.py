"""Evaluation: splits, metrics, votes and reports shared by every slide-level recipe."""
