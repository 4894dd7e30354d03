"""The seed papers' experiments: in-context linear regression, their toy models trained, the demo."""
