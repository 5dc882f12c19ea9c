"""Kernels: Triton implementations beside plain-torch references. Imports nothing of the project."""
