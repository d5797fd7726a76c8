"""Spatial normalisation to a standard template (ANTs) and the derivatives in template space."""
