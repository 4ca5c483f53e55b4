"""pd-decode: OpenAI-compatible decode node."""
