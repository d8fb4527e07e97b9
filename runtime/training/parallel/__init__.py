"""Parallelism: layout (dims), data parallel (FSDP2 / DDP / HSDP + compression), tensor and pipeline
parallel."""
