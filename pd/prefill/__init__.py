"""pd-prefill: the prefill node."""
