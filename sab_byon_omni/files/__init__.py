"""The bottom I/O layer: atomic writes, the one folder lock, checkpoint files (single and sharded)
and the reading of files we did not write. It imports nothing of the package but ``errors``, so
``data``, ``model``, ``training`` and the interop layer all build on it.
"""
