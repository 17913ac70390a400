"""What users start: the ``omni-diffuse`` CLI, the HTTP server, the external worker, and the
SPMD entry that runs one program on every rank."""
