"""SAM2 video tracking over a volume's slices: frames and their feature cache, prompts, the
session, propagation passes, the self-sorting memory bank, results, image sets and axis fusion."""
