"""Nipype interfaces: thin wrappers around m2m's library functions."""
