"""Ray Serve deployments: router, scheduler, workers, the OpenAI protocol and the app builder."""
