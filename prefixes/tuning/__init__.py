"""Fine-tuning's records: tenants' training files, jobs and their events in the database."""
