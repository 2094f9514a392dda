"""The knowledge-editing service: REST API, SQL edit log and versions, queued worker, rollback."""
