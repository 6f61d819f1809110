"""The one flow the CLI, the UI and a remote job all call: recipe -> merge (`merging`) -> output files (`outputs`)
-> samples -> card -> push (`run`); a written result and the recipe it records (`result`); `convert` and `inspect`,
built on the same merge."""
