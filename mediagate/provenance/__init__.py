"""Provenance: a signed C2PA manifest on every image and video mediagate returns."""
