"""train layer of jaxrlhf."""
