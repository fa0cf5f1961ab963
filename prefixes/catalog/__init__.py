"""The catalog: tenants, API keys, quotas, names, prefix versions and stored ensembles, as rows
in the registry's database, and the plain records handed out about them."""
