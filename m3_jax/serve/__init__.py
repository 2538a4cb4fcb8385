"""`m3 serve`: an OpenAI-compatible chat server where each request chooses its visual-token budget."""
