"""Who used what: counts per tenant, model and hour, gathered in memory where the work happens
(`UsageMeter`), written in batches by one background writer (`UsageFlusher`) as upserts that
add into the same rows (`ledger`), so replicas on one database add up."""
