"""What produced what: queries over stored runs (``queries``), drawn by ``render``, the
``algodock lineage`` commands (``commands``) and OpenLineage events (``openlineage``)."""
