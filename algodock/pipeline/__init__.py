"""Pipelines of steps: the spec and its validation (``spec``), the shared resource pool
(``capacity``), and one step executed against a store (``execute``)."""
