"""prefix-server: one frozen causal LM, many tenants' prefixes, one batch."""
