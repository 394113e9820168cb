"""Training: the worker loop (Ray Train worker or a plain process) and its Ray assembly."""
