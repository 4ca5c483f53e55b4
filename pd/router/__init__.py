"""pd-router: routing across prefill and decode nodes, residency index, simulator."""
