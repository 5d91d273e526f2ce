"""Training the student: `objectives` (one class per objective: what it reads, its loss, its val metrics),
`optim`, `trainer` (the loop), `parallel` (DDP/FSDP), `state` (resume checkpoints), `tracking`."""
