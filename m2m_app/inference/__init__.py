"""Inference: conforming a T1w to the model grid and running the trained translators."""
