"""Hand-written kernels for the MoE layer (Triton; optional: import guarded by callers)."""
