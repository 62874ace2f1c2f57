"""The worker side: generators (backends), asset exporters and the generation pipeline."""
