"""LoRAs on the engine's streaming: the weight updates of every file kind (weights), extraction from a fine-tune
by SVD (extract, svd), LoRA files written (files) and LoRA merging (merge). Bake-in lives in hubmix.lorabake."""
