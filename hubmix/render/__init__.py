"""See what you merged: sample images rendered with diffusers under fixed conventions (`samples`), parameter sweeps
rendered from merged weights held in memory (`sweep`), labelled grids (`grid`) and the dry-run plot (`plot`).

Rendering sits above the merge flow: it imports merging, engine and hub; none of them imports it."""
