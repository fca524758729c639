"""Text to token batches: the GPT-2 tokenizer, the shard format and its integrity, text streams, data_prep.py's
preparation, and the data sources training reads (source.py: one interface; shards or a stream behind it), with the
validation batches."""
