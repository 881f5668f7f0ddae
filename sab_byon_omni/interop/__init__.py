"""Models from and for the rest of the ecosystem: ``transformers`` folders (import and export),
their tokenizers, and every place a model can come from (``sources``). It sits above ``model`` and
``data``, which never import it.
"""
