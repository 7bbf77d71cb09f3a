"""Large contrastive batches on little memory: GradCache."""
