"""Engine glue above the tuner: gathering sharded tensors, FSDP2 placement and loading, per-rank reports."""
