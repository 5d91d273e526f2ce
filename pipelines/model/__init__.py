"""The student: `gpt` (the CoCoMix/NTP/pause transformer), `generation` (sampling), `checkpoint` (model
folders), `flops` (parameter and FLOP counts), `steering` (reading and amplifying predicted concepts)."""
