"""saecat's front doors: the CLI (and, later, HTTP) over the catalog's Python API."""
