"""Training: schemas (config), corpus and batches (data), the loop (loop), training
checkpoints for exact resume (state), export to the moe_ext format (export), and the
per-run JSON log and loss curve (report). ``launch/train.py`` glues them together."""
