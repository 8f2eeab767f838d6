"""Holographic Distributed Memory (SPEC §3.7): packed binary hypervectors
(`hypervector`), majority bundles with kept counters (`banks`), the entry store and
retrieval (`store`), the model-to-hypervector codebook (`codebook`), the memory file
(`memory_file`), and the recall MPD consults on disagreement (`recall`)."""
