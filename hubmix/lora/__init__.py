"""LoRAs on the engine's streaming: baked into a merge's tensors as they stream (`bake`), the weight updates of
every file kind (`weights`), extraction from a fine-tune by SVD (`extract`, `svd`), LoRA files written (`files`),
LoRA merging (`merge`), and the extract-lora flow with samples and push (`publish`)."""
