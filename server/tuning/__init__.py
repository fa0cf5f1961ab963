"""Fine-tuning jobs: tenants' training files become personal prefixes, trained on the served
model beside serving (docs/fine-tuning.md)."""
