"""saecat's front doors, thin over the same core calls: the CLI (`saecat`), the HTTP API and the
browser pages (`saecat serve`), and what they share for output."""
