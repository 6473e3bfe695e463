"""Model catalog, pipeline loading (tiny://, local, hf://, simulated://) and output encoding."""
