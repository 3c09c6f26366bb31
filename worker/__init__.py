"""One clip-supervisor worker: fetch/ack, pipeline, storage. Never imports ``supervisor``."""
