"""Trainer checkpoints of recipe runs: ownership and completion markers, resume, trust, FSDP2 (DCP) and DeepSpeed
(universal) formats for resuming on another number of ranks."""
