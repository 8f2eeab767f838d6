"""The model directory (SPEC §3.5): file format, manifest reading and checking,
shared weights as stored, and atomic publication of an export."""
