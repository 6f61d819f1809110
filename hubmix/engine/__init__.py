"""The one streaming engine every command uses: key alignment and the mismatch rules (`plan`), the chunked pipeline
of prefetcher, workers and writer (`pipeline`), fused kernels (`kernels`, `native`), devices (`devices`), output
routing and atomic targets (`output`) and the dry-run statistics (`analysis`)."""
