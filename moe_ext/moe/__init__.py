"""Mixture-of-Experts layer built from three swappable parts: router, dispatcher, experts."""
