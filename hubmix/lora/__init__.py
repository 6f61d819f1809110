"""LoRAs on the engine's streaming: baked into a merge's tensors as they stream (`bake`)."""
