"""Command-line interfaces: ``m2m`` (the BIDS-App) and ``m2m-train`` (training)."""
