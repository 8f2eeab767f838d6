"""Export of a trained run to a model directory: ternary expert regions, neighbour
deltas, GPTQ calibration of shared weights, synthetic model directories."""
