"""rl layer of jaxrlhf."""
