"""What models look like on disk: families as data (`families/`), key layouts and their mapping engine (`layouts`),
config inference (`configs`), tensor readers and the planned writer (`io/`), opening a model in either layout
(`model`), and tiny random pipelines for tests and the demo (`tiny`)."""
