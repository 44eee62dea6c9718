"""data layer of jaxrlhf."""
