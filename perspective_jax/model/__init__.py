"""The Perspective network: Flax blocks and their parts, PDR and GQA mixers, the routed
FFN, extension points, parameter census, sampling and in-memory generation."""
