"""Queue-length autoscaling policy and its limits (built in the autoscaling issue)."""
