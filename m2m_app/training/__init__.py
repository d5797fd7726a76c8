"""Training the translators: slice datasets, the adversarial training loop and evaluation."""
