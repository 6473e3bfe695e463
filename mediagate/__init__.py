"""mediagate: OpenAI-compatible image and video generation on Ray Serve."""

__version__ = "0.1.0"
