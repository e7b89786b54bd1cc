"""Apache Beam transforms of cg_tf's pipelines (shipped to workers in the package)."""
