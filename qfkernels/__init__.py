"""Packed integer weight layouts and the code that computes with them.

packing        codes <-> int32 words (the artifact's byte layout)
packed_weight  PackedWeight: the tensors a kernel reads
reference      pure-torch unpack, dequantize and matmul (the oracle, and the CPU path)
triton_gemv    split-K GEMV for decode (M <= 16)        } import triton; loaded lazily,
triton_gemm    tiled GEMM for prefill (larger M)        } so `import qfkernels` needs no triton
quant_linear   QuantLinear (nn.Linear over packed weights) and replace_linears
"""
