"""Speculative decoding: sampling, drafters, the jitted draft-and-verify loop, trees."""
