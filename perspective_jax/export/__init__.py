"""Export of a trained run to a model directory: ternary expert regions, neighbour
deltas, GPTQ calibration of shared weights, the disk space an export needs,
synthetic model directories."""
