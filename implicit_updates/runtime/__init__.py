"""Runtime guards around a user's model: the model left untouched, the compute dtype (streamed upcasts and the
float64 formula), accelerate dispatch, always-removed hooks, and prompt parsing. Nothing here knows an analysis."""
