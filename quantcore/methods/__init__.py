"""Quantization methods. Each has pure math (this package) producing `QuantizedWeight`."""
