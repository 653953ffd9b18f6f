"""One module per CLI command; agent/cli.py only groups them."""
