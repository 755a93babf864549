"""The bottom layer: atomic folder writes, the cache folder, memory-mapped weights, model-structure helpers.

Imports nothing else from restora; every other package may import it.
"""
