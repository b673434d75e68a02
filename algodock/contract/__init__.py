"""The algorithm contract (docs/contract.md): the manifest, what the container sees, what it returns.

``manifest`` holds the pydantic models of the manifest, ``algo_input.json`` and
``algo_output.json``; ``documents`` reads JSON and YAML that someone else wrote (duplicate
keys rejected, nesting bounded before a parser recurses); ``params`` fills in and checks
parameters against a manifest's JSON Schema.
:mod:`algodock.schemas` exports the models as the JSON Schema files in ``schemas/``.
"""
