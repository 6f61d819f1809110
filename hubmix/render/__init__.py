"""See what you merged: sample images rendered with diffusers under fixed conventions (`samples`), parameter sweeps
rendered from merged weights held in memory (`sweep`), labelled grids (`grid`) and the dry-run plot (`plot`).

Rendering sits beside the merge flow: it imports flow.merging, engine and hub; of the flow, only `flow.run` (samples
after a merge) imports it."""
