"""Where runs keep their outputs and records: a local folder (``local``) or an S3 prefix (``s3``),
behind one interface (``base``), laid out by ``layout``, fed by ``transfer``; ``backends.open_store`` picks one."""
