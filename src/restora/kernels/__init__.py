"""Fast paths: native C/C++ kernels built on first use, compiled training blocks, packed weights, padding-free
forward, the fused head loss. Each has a pure-torch fallback (RESTORA_NATIVE=0 turns the native ones off).

Imports nothing from restora's domain packages, only restora.core.
"""
