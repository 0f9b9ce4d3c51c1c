"""Simulated Writ devices and fleets."""
