"""Routed-expert geometry and mechanics (SPEC §3.3): the torus T³, dropless dispatch,
routing metrics, MDS re-embedding of experts onto the lattice."""
