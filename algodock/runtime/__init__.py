"""Running one algorithm container: the engine connection, the sandbox, staging, logs, outputs.

``runner.run_step`` is the entry point: it resolves the image to its immutable id
(``engine``), stages the inputs (``staging``, or ``volumes`` for a remote engine), starts
the container with every restriction of docs/contract.md §2 (``sandbox``), streams its log
(``logs``), and reads and hashes what it wrote (``outputs``).
"""
