"""The GPU replicas: text-to-image and text-to-video."""
