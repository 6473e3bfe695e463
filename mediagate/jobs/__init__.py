"""The life cycle of accepted work: named transitions over the state store, with the
quota settled in them (once), so no deployment writes a job's status by hand."""
