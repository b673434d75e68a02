"""The Prefect layer: a pipeline as a Prefect flow (``pipeline``), its UI artifacts
(``artifacts``) and the ``algodock run`` command (``cli``). Built on the engine; the engine
never imports it."""
