"""Quantized modules and the CPU kernels they run on (see `zeropoint.nn.kernels`)."""
