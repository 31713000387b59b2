"""Inference: the slide scorer, slide predictions and attention heatmaps."""
