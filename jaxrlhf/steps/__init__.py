"""steps layer of jaxrlhf."""
