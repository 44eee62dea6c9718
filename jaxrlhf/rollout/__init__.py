"""rollout layer of jaxrlhf."""
