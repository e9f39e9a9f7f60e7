"""Models: the catalog of named GGUF models (`catalog`) and the local cache their files live in (`store`)."""
