"""Nipype workflows assembled from m2m's interfaces."""
