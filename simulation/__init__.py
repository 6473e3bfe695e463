"""The surge simulator: mediagate's own scheduling, admission, quota and autoscaling
code driven in simulated time against a simulated GPU fleet (docs/SCALE.md)."""
