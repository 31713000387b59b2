"""Evaluation: splits, metrics, paired comparisons and reports shared by every slide-level recipe."""
