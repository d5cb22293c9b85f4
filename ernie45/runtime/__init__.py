"""The runtime: how the model runs fast here (kernel builds, and later the fused and quantized paths)."""
