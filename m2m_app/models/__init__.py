"""Learned models: the continuous tractography field (NeRF) fitted to track-density slices."""
