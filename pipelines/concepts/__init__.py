"""Where concepts come from: `teacher` (the pretrained LM, its hidden states and gradients) and `targets`
(the SAE a run uses, the teacher and SAE together, stored hidden states)."""
