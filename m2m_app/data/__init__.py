"""Data shipped in the package: translator weights and the example dataset."""
