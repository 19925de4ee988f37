"""Built-in reward functions; a user reward file looks exactly like these."""
