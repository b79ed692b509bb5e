"""Packed integer weight layouts and the code that computes with them."""
