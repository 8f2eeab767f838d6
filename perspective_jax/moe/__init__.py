"""Routed experts on the torus T³ (SPEC §3.3): geometry, router, dispatch, losses."""
