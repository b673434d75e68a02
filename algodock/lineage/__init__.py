"""What produced what: the step cache (``cache``), queries over stored runs (``queries``:
``algodock lineage``) and OpenLineage events (``openlineage``)."""
