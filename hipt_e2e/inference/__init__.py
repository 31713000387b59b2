"""Inference: slide predictions and attention heatmaps."""
