"""File formats and safe writing: atomic writes, checkpoint files, safetensors and transformers export.

Nothing here knows about training loops: these modules read and write files, and are used by
``training``, ``core`` and the CLI commands alike.
"""
