"""Where runs keep their outputs and records: a local folder or an S3 prefix (``backends``)."""
