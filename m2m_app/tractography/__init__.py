"""Streamlines and rendered views from the continuous tractography field."""
