"""oracle layer of jaxrlhf."""
