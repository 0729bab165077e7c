"""Engine glue: process-group facts, gathering sharded tensors, FSDP2 placement, ZeRO-3 reports."""
