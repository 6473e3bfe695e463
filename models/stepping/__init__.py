"""Step-level denoising: the loop of a diffusers pipeline written out, so a worker can
run one denoising step at a time for requests at different steps (issue 17)."""
