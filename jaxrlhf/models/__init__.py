"""models layer of jaxrlhf."""
